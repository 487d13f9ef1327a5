/**
 * Ring all-reduce (sum, float32) and ring all-gather (byte blobs) over FrameLinks,
 * chunked and pipelined. See docs/protocol.md, "Data plane (ring)".
 *
 * All-reduce: the buffer of L elements is cut into N segments (sizes differ by at most
 * one). In phase p (0 .. 2(N-1)-1) rank r sends segment (r - p) mod N to next and
 * receives segment (r - 1 - p) mod N from prev; phases 0 .. N-2 are the reduce-scatter
 * (the received chunk is decoded and added), phases N-1 .. 2N-3 the all-gather (it is
 * decoded into the buffer). Each segment travels as chunks of at most chunkBytes wire
 * bytes. Received chunk c of phase p is exactly what rank r sends as chunk c of phase
 * p+1, so the sender streams: a chunk goes out as soon as it has been summed, while
 * later chunks are still arriving.
 *
 * Wire codecs (codecs.ts): the buffer stays float32, each chunk travels as f32, f16,
 * bf16, int8 or int4. Reduce-scatter chunks are encoded from the running partial sums. The
 * owner of a fully reduced segment (rank r owns segment (r + 1) mod N) replaces its
 * values with decode(encode(values)) as it sends them in phase N-1, and all-gather
 * chunks are forwarded as the very bytes received, so every member decodes the same
 * bytes into the same bits: all replicas end bitwise identical, whatever the codec.
 *
 * All-gather of blobs: N-1 phases; in phase p rank r forwards the blob of rank
 * (r - p) mod N (its own in phase 0), in chunks of at most chunkBytes, each forwarded as
 * soon as it arrives. All-reduces and all-gathers share one op counter.
 *
 * Flow control: received frames are always consumed at once (summed into the buffer,
 * never queued behind a send), and the sender reads the buffer only when the next link
 * has room (FrameLink backpressure). Nothing can deadlock and memory stays bounded
 * (received frames that are to be forwarded unchanged are held until sent: at most the
 * op's own wire bytes).
 */
import { ProtocolError } from "../errors.js";
import type { FrameLink } from "../net/link.js";
import { CLOSE_ABORTED, CLOSE_PROTOCOL, LinkClosedError } from "../net/link.js";
import {
  BLOB_HEADER_BYTES,
  type BlobChunkFrame,
  CHUNK_HEADER_BYTES,
  type ChunkFrame,
  chunkCodec,
  concatBytes,
  DEFAULT_CHUNK_BYTES,
  decodeFrame,
  encodeBlobChunk,
  chunkFrameBytes,
  encodeChunkInto,
  encodeControl,
  type Frame,
  MAX_CHUNK_BYTES,
  newChunkFrame,
  setFramePhase,
  WIRE_CODECS,
  type WireCodec,
  wirePayloadBytes,
} from "../protocol/frames.js";
import { chunkElements, decodePayload, encodePayload } from "./codecs.js";
import { FramePool } from "./framePool.js";

export type { WireCodec } from "../protocol/frames.js";

export interface RingOptions {
  rank: number;
  size: number;
  /** Link to rank (rank + 1) mod size; null only when size is 1. */
  next: FrameLink | null;
  /** Link from rank (rank - 1) mod size; null only when size is 1. */
  prev: FrameLink | null;
  /** Wire payload bytes per chunk frame (multiple of 4); all members must use the same. */
  chunkBytes?: number;
  /** Cap on chunk bytes buffered for an op that prev started before we did. */
  maxBufferedBytes?: number;
  /** Largest blob an all-gather accepts (any rank's); all members must use the same. */
  maxBlobBytes?: number;
}

export interface AllReduceOptions {
  /** How chunks travel (default "f32": exact). All members must pass the same codec. */
  codec?: WireCodec;
}

export interface RingStats {
  op: number;
  /** Every byte this rank sent for the op, frame headers and the op frame included. */
  bytesSent: number;
  /** Wire payload bytes this rank sent (chunk payloads summed; blob bytes for all-gather). */
  payloadBytes: number;
  /** Frames sent, the op control frame included. */
  frames: number;
  seconds: number;
}

export interface AllGatherResult {
  /** Every rank's blob, in rank order (fresh copies, this rank's included). */
  blobs: Uint8Array[];
  stats: RingStats;
}

export interface SegmentBounds {
  /** first element */
  start: number;
  /** one past the last element */
  end: number;
}

/** The neighbour link that was lost, with its close code. */
export class LinkLostError extends Error {
  constructor(
    readonly neighbour: "prev" | "next",
    readonly peerRank: number,
    readonly code: number,
    reason: string,
  ) {
    super(
      `ring neighbour ${neighbour} (rank ${peerRank}) disconnected (code ${code}${reason ? `: ${reason}` : ""})`,
    );
    this.name = "LinkLostError";
  }
}

export const DEFAULT_MAX_BUFFERED_BYTES = 1024 * 1024 * 1024;
export const DEFAULT_MAX_BLOB_BYTES = 256 * 1024 * 1024;

/** Split L elements into N contiguous segments whose sizes differ by at most one. */
export function segmentBounds(length: number, size: number): SegmentBounds[] {
  if (!Number.isInteger(length) || length < 0) throw new RangeError(`bad length ${length}`);
  if (!Number.isInteger(size) || size < 1) throw new RangeError(`bad ring size ${size}`);
  const base = Math.floor(length / size);
  const extra = length % size;
  const out: SegmentBounds[] = [];
  let start = 0;
  for (let s = 0; s < size; s++) {
    const len = base + (s < extra ? 1 : 0);
    out.push({ start, end: start + len });
    start += len;
  }
  return out;
}

function mod(a: number, n: number): number {
  return ((a % n) + n) % n;
}

/** Segment that `rank` sends in `phase`. */
export function sentSegment(rank: number, phase: number, size: number): number {
  return mod(rank - phase, size);
}

function chunksIn(len: number, chunkElems: number): number {
  return len === 0 ? 0 : Math.ceil(len / chunkElems);
}

/** Visit every chunk (as its element count) that `rank` sends in one all-reduce. */
function forEachSentChunk(
  length: number,
  size: number,
  rank: number,
  codec: WireCodec,
  chunkBytes: number,
  visit: (count: number) => void,
): void {
  const segs = segmentBounds(length, size);
  const per = chunkElements(codec, chunkBytes);
  for (let p = 0; p < 2 * (size - 1); p++) {
    const s = segs[sentSegment(rank, p, size)];
    const len = s.end - s.start;
    const full = Math.floor(len / per);
    for (let c = 0; c < full; c++) visit(per);
    if (len % per !== 0) visit(len % per);
  }
}

/**
 * Wire payload bytes rank sends in one all-reduce of L float32 values on N ranks
 * (RingStats.payloadBytes). For f32, f16 and bf16 this does not depend on chunkBytes.
 */
export function expectedBytesPerNode(
  length: number,
  size: number,
  rank: number,
  codec: WireCodec = "f32",
  chunkBytes: number = DEFAULT_CHUNK_BYTES,
): number {
  let bytes = 0;
  forEachSentChunk(length, size, rank, codec, chunkBytes, (count) => {
    bytes += wirePayloadBytes(codec, count);
  });
  return bytes;
}

/**
 * Every byte rank sends in one all-reduce of L elements on N ranks with `codec`: the op
 * control frame, chunk headers and payloads, exactly as RingStats.bytesSent counts them
 * (0 when N is 1). With codec "f32" it is what the all-reduce costs uncompressed.
 */
export function expectedFrameBytesPerNode(
  length: number,
  size: number,
  rank: number,
  codec: WireCodec = "f32",
  chunkBytes: number = DEFAULT_CHUNK_BYTES,
): number {
  if (size === 1) return 0;
  let bytes = encodeControl({ t: "op", op: 0, kind: "allreduce", count: length, dtype: "float32", codec }).byteLength;
  forEachSentChunk(length, size, rank, codec, chunkBytes, (count) => {
    bytes += CHUNK_HEADER_BYTES + wirePayloadBytes(codec, count);
  });
  return bytes;
}

/**
 * Every byte rank sends in one all-gather where rank i contributes sizes[i] bytes (the
 * op frame, blob chunk headers and bytes), as RingStats.bytesSent counts them.
 */
export function expectedAllGatherBytesPerNode(
  sizes: number[],
  rank: number,
  chunkBytes: number = DEFAULT_CHUNK_BYTES,
): number {
  const size = sizes.length;
  if (size <= 1) return 0;
  let bytes = encodeControl({ t: "op", op: 0, kind: "allgather", size: sizes[rank] }).byteLength;
  for (let p = 0; p < size - 1; p++) {
    const total = sizes[mod(rank - p, size)];
    bytes += Math.max(1, Math.ceil(total / chunkBytes)) * BLOB_HEADER_BYTES + total;
  }
  return bytes;
}

type OpKind = "allreduce" | "allgather";

interface Early {
  frame: ChunkFrame | BlobChunkFrame;
  bytes: Uint8Array;
}

/** Receive-side cursor over one op's expected frame sequence (from prev). */
interface RxBase {
  op: number;
  /** next expected phase; phases done when it reaches the op's phase count */
  phase: number;
  /** next expected chunk within the phase */
  chunk: number;
  done: boolean;
  /** frames received before the local op started (validated, not yet applied) */
  early: Early[];
  earlyBytes: number;
  target: OpState | null;
}

interface ReduceRx extends RxBase {
  kind: "allreduce";
  count: number;
  codec: WireCodec;
  chunkElems: number;
  segs: SegmentBounds[];
}

interface GatherRx extends RxBase {
  kind: "allgather";
  /** prev's own blob length, as announced */
  size: number;
  /** the current phase's blob length; -1 before its first chunk */
  total: number;
  /** next expected byte of the current phase's blob */
  offset: number;
}

type RxState = ReduceRx | GatherRx;

interface OpBase {
  op: number;
  started: number;
  rx: RxState | null;
  rxDone: boolean;
  sendDone: boolean;
  settled: boolean;
  bytesSent: number;
  payloadBytes: number;
  frames: number;
  /** received frames to send on unchanged, in order, with the phase they go out in */
  forward: Array<{ bytes: Uint8Array; phase: number }>;
  wake: (() => void) | null;
  reject: (e: Error) => void;
}

interface ReduceOp extends OpBase {
  kind: "allreduce";
  data: Float32Array;
  codec: WireCodec;
  chunkElems: number;
  segs: SegmentBounds[];
  resolve: (s: RingStats) => void;
}

interface GatherOp extends OpBase {
  kind: "allgather";
  /** this rank's blob (a copy) */
  blob: Uint8Array;
  /** received chunks of each rank's blob, until it is complete */
  parts: Uint8Array[][];
  blobs: Array<Uint8Array | null>;
  resolve: (r: AllGatherResult) => void;
}

type OpState = ReduceOp | GatherOp;

/** The progress fields every op starts with. */
function freshProgress(op: number, started: number, reject: (e: Error) => void): OpBase {
  return { op, started, rx: null, rxDone: false, sendDone: false, settled: false, bytesSent: 0, payloadBytes: 0, frames: 0, forward: [], wake: null, reject };
}


export class RingAllReduce {
  readonly rank: number;
  readonly size: number;
  readonly chunkBytes: number;
  /** float32 elements per chunk (codec f32) */
  readonly chunkElems: number;
  readonly maxBlobBytes: number;
  private readonly next: FrameLink | null;
  private readonly prev: FrameLink | null;
  private readonly phases: number;
  private readonly maxBufferedBytes: number;
  /** op id the next local op gets */
  private nextOp = 0;
  /** op id prev must announce next */
  private rxNextOp = 0;
  private cur: OpState | null = null;
  private rx: RxState | null = null;
  private dead: Error | null = null;
  private completed = 0;
  private readonly unsubscribe: Array<() => void> = [];
  /** f32 chunk frames are encoded into these and reused once sent */
  private readonly framePool: FramePool;

  constructor(opts: RingOptions) {
    const { rank, size } = opts;
    if (!Number.isInteger(size) || size < 1 || size > 32768) throw new RangeError(`bad ring size ${size}`);
    if (!Number.isInteger(rank) || rank < 0 || rank >= size) throw new RangeError(`bad rank ${rank} for ring of ${size}`);
    const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    if (!Number.isInteger(chunkBytes) || chunkBytes < 4 || chunkBytes % 4 !== 0 || chunkBytes > MAX_CHUNK_BYTES) {
      throw new RangeError(`chunkBytes must be a multiple of 4 in [4, ${MAX_CHUNK_BYTES}], got ${chunkBytes}`);
    }
    const maxBlobBytes = opts.maxBlobBytes ?? DEFAULT_MAX_BLOB_BYTES;
    if (!Number.isInteger(maxBlobBytes) || maxBlobBytes < 0 || maxBlobBytes > 0xffffffff) {
      throw new RangeError(`maxBlobBytes must be an integer in [0, 2^32 - 1], got ${maxBlobBytes}`);
    }
    if (size > 1 && (!opts.next || !opts.prev)) {
      throw new Error(`ring of ${size} needs both next and prev links`);
    }
    this.rank = rank;
    this.size = size;
    this.chunkBytes = chunkBytes;
    this.chunkElems = chunkBytes / 4;
    this.framePool = new FramePool(chunkFrameBytes(this.chunkElems));
    this.maxBlobBytes = maxBlobBytes;
    this.phases = 2 * (size - 1);
    this.maxBufferedBytes = opts.maxBufferedBytes ?? DEFAULT_MAX_BUFFERED_BYTES;
    this.next = size > 1 ? opts.next : null;
    this.prev = size > 1 ? opts.prev : null;
    if (this.prev && this.next) {
      const prevRank = mod(rank - 1, size);
      const nextRank = mod(rank + 1, size);
      this.unsubscribe.push(
        this.prev.onFrame((bytes) => this.onPrevFrame(bytes)),
        this.next.onFrame(() =>
          this.violation(new ProtocolError(`unexpected frame from next (rank ${nextRank}): ring links are one-way`)),
        ),
        this.prev.onClose((code, reason) => this.fail(new LinkLostError("prev", prevRank, code, reason), CLOSE_ABORTED)),
        this.next.onClose((code, reason) => this.fail(new LinkLostError("next", nextRank, code, reason), CLOSE_ABORTED)),
      );
    }
  }

  /** Number of ops (all-reduces and all-gathers) completed. */
  get opsCompleted(): number {
    return this.completed;
  }

  /** Set once the ring has failed, been aborted or closed; every later op rejects with it. */
  get error(): Error | null {
    return this.dead;
  }

  /**
   * Sum `data` in place across all members. Ops are sequential: call again only after
   * the previous promise settled. Every member ends with bitwise identical values; with
   * a lossy codec they are the owner's decode(encode(sum)) of each segment. On failure
   * the ring is dead (links closed) and the promise rejects: with ProtocolError for a
   * frame that broke the protocol (nothing from it was summed), LinkLostError when a
   * neighbour went away. A ring of one sends nothing and leaves `data` as it is.
   */
  allReduce(data: Float32Array, opts: AllReduceOptions = {}): Promise<RingStats> {
    if (!(data instanceof Float32Array)) return Promise.reject(new TypeError("allReduce takes a Float32Array"));
    const codec = opts.codec ?? "f32";
    if (!WIRE_CODECS.includes(codec)) return Promise.reject(new TypeError(`unknown wire codec ${String(codec)}`));
    const check = this.checkStart();
    if (check) return Promise.reject(check);
    if (data.length > 0xffffffff) return Promise.reject(new RangeError("buffer too large for the ring protocol"));
    const op = this.nextOp++;
    const started = performance.now();
    if (this.size === 1) {
      this.completed++;
      return Promise.resolve({ op, bytesSent: 0, payloadBytes: 0, frames: 0, seconds: (performance.now() - started) / 1000 });
    }
    return new Promise<RingStats>((resolve, reject) => {
      const state: ReduceOp = {
        ...freshProgress(op, started, reject),
        kind: "allreduce",
        data,
        codec,
        chunkElems: chunkElements(codec, this.chunkBytes),
        segs: segmentBounds(data.length, this.size),
        resolve,
      };
      this.begin(state, () => this.pumpReduce(state));
    });
  }

  /**
   * Every member contributes a blob (any length up to maxBlobBytes, 0 included, lengths
   * may differ); every member gets all blobs in rank order. Sequential with allReduce
   * (one op at a time, one shared op counter); failures as for allReduce.
   */
  allGather(blob: Uint8Array): Promise<AllGatherResult> {
    if (!(blob instanceof Uint8Array)) return Promise.reject(new TypeError("allGather takes a Uint8Array"));
    const check = this.checkStart();
    if (check) return Promise.reject(check);
    if (blob.byteLength > this.maxBlobBytes) {
      return Promise.reject(new RangeError(`blob of ${blob.byteLength} bytes exceeds maxBlobBytes ${this.maxBlobBytes}`));
    }
    const op = this.nextOp++;
    const started = performance.now();
    const own = blob.slice();
    if (this.size === 1) {
      this.completed++;
      return Promise.resolve({
        blobs: [own],
        stats: { op, bytesSent: 0, payloadBytes: 0, frames: 0, seconds: (performance.now() - started) / 1000 },
      });
    }
    return new Promise<AllGatherResult>((resolve, reject) => {
      const blobs: Array<Uint8Array | null> = new Array(this.size).fill(null);
      blobs[this.rank] = own;
      const state: GatherOp = {
        ...freshProgress(op, started, reject),
        kind: "allgather",
        blob: own,
        parts: Array.from({ length: this.size }, () => []),
        blobs,
        resolve,
      };
      this.begin(state, () => this.pumpGather(state));
    });
  }

  /** Reject the in-flight op (if any) and close both links: the ring is unusable afterwards. */
  abort(reason: string): void {
    this.fail(new Error(`ring all-reduce aborted: ${reason}`), CLOSE_ABORTED);
  }

  /** Close both links normally; an op in flight is rejected. */
  close(): void {
    this.fail(new Error("ring closed"), 1000);
  }

  private checkStart(): Error | null {
    if (this.dead) return this.dead;
    if (this.cur) return new Error("a ring op (allReduce or allGather) is already in progress: ops are sequential");
    return null;
  }

  private begin(state: OpState, pump: () => Promise<void>): void {
    this.cur = state;
    if (this.rx && this.rx.op === state.op) {
      try {
        this.attach(this.rx, state);
      } catch (err) {
        this.violation(err);
        return;
      }
    }
    pump().catch((err: unknown) => {
      if (state.settled) return;
      const e = err instanceof Error ? err : new Error(String(err));
      if (e instanceof LinkClosedError && this.next) {
        // A send on a link that is closing: its close, a LinkLostError naming the
        // neighbour, follows (over TLS the socket ends before ws reports the close).
        const timer = setTimeout(() => this.fail(e, CLOSE_PROTOCOL), 2000);
        this.next.onClose(() => clearTimeout(timer));
        return;
      }
      this.fail(e, CLOSE_PROTOCOL);
    });
  }

  // ---- receive side -------------------------------------------------------------

  /** Segment received in `phase` from prev. */
  private rxSegment(segs: SegmentBounds[], phase: number): SegmentBounds {
    return segs[sentSegment(mod(this.rank - 1, this.size), phase, this.size)];
  }

  /** Skip past finished (or empty) phases. */
  private normalize(rx: ReduceRx): void {
    while (rx.phase < this.phases) {
      const seg = this.rxSegment(rx.segs, rx.phase);
      if (rx.chunk < chunksIn(seg.end - seg.start, rx.chunkElems)) break;
      rx.phase++;
      rx.chunk = 0;
    }
    rx.done = rx.phase >= this.phases;
  }

  private onPrevFrame(bytes: Uint8Array): void {
    if (this.dead) return;
    try {
      this.handleFrame(decodeFrame(bytes), bytes);
    } catch (err) {
      this.violation(err);
    }
  }

  private handleFrame(frame: Frame, bytes: Uint8Array): void {
    const prevRank = mod(this.rank - 1, this.size);
    if (frame.kind === "control") {
      const m = frame.msg;
      if (m.t !== "op") throw new ProtocolError(`unexpected "${m.t}" control frame from prev (rank ${prevRank})`);
      if (m.kind === "pipe") throw new ProtocolError(`a pipe message from prev (rank ${prevRank}) on a ring link`);
      if (this.rx && !this.rx.done) {
        throw new ProtocolError(`prev announced op ${m.op} before finishing op ${this.rx.op}`);
      }
      if (this.rx && this.rx.target === null) {
        throw new ProtocolError(`prev announced op ${m.op} while op ${this.rx.op} is still buffered (more than one op ahead)`);
      }
      if (m.op !== this.rxNextOp) {
        throw new ProtocolError(`prev announced op ${m.op}, expected op ${this.rxNextOp}`);
      }
      let rx: RxState;
      const base = { op: m.op, phase: 0, chunk: 0, done: false, early: [], earlyBytes: 0, target: null };
      if (m.kind === "allgather") {
        if (m.size > this.maxBlobBytes) {
          throw new ProtocolError(`prev announced all-gather op ${m.op} with a blob of ${m.size} bytes, more than maxBlobBytes ${this.maxBlobBytes}`);
        }
        rx = { ...base, kind: "allgather", size: m.size, total: -1, offset: 0 };
      } else {
        const codec = m.codec ?? "f32";
        rx = {
          ...base,
          kind: "allreduce",
          count: m.count,
          codec,
          chunkElems: chunkElements(codec, this.chunkBytes),
          segs: segmentBounds(m.count, this.size),
        };
        this.normalize(rx);
      }
      this.rxNextOp++;
      this.rx = rx;
      if (this.cur && this.cur.op === m.op) this.attach(rx, this.cur);
      return;
    }

    const rx = this.rx;
    if (!rx || rx.done) {
      const what = frame.kind === "chunk" ? `tensor chunk (op ${frame.op}, phase ${frame.phase}, chunk ${frame.chunk})` : `blob chunk (op ${frame.op}, phase ${frame.phase}, owner ${frame.owner})`;
      throw new ProtocolError(`${what} without an op announcement`);
    }
    let wire: number;
    if (frame.kind === "chunk") {
      if (rx.kind !== "allreduce") {
        throw new ProtocolError(`tensor chunk from prev (rank ${prevRank}) during all-gather op ${rx.op}`);
      }
      this.checkChunk(rx, frame, prevRank);
      wire = bytes.byteLength - CHUNK_HEADER_BYTES;
    } else {
      if (rx.kind !== "allgather") {
        throw new ProtocolError(`blob chunk from prev (rank ${prevRank}) during all-reduce op ${rx.op}`);
      }
      this.checkBlob(rx, frame, prevRank);
      wire = frame.length;
    }
    if (rx.target) {
      this.apply(rx.target, frame, bytes);
    } else {
      if (rx.earlyBytes + wire > this.maxBufferedBytes) {
        throw new ProtocolError(`prev sent more than ${this.maxBufferedBytes} bytes ahead of the local op`);
      }
      rx.early.push({ frame, bytes });
      rx.earlyBytes += wire;
    }
    if (rx.kind === "allreduce") {
      rx.chunk++;
      this.normalize(rx);
    } else {
      rx.chunk++;
      rx.offset += (frame as BlobChunkFrame).length;
      if (rx.offset === rx.total) {
        rx.phase++;
        rx.chunk = 0;
        rx.offset = 0;
        rx.total = -1;
        rx.done = rx.phase >= this.size - 1;
      }
    }
    if (rx.target) {
      // the gather sender waits on the receive phase; a reduce sender on the chunk
      this.wake(rx.target);
      if (rx.done) {
        rx.target.rxDone = true;
        this.maybeFinish(rx.target);
      }
    }
  }

  /** The tensor chunk must be exactly the next one expected, in the announced codec. */
  private checkChunk(rx: ReduceRx, frame: ChunkFrame, prevRank: number): void {
    const codec = chunkCodec(frame);
    if (codec !== rx.codec) {
      throw new ProtocolError(
        `tensor chunk from prev (rank ${prevRank}) is ${codec} but op ${rx.op} was announced as ${rx.codec} ` +
          `(op ${frame.op}, phase ${frame.phase}, chunk ${frame.chunk})`,
      );
    }
    const seg = this.rxSegment(rx.segs, rx.phase);
    const offset = seg.start + rx.chunk * rx.chunkElems;
    const count = Math.min(rx.chunkElems, seg.end - offset);
    if (
      frame.op !== rx.op ||
      frame.phase !== rx.phase ||
      frame.chunk !== rx.chunk ||
      frame.offset !== offset ||
      frame.count !== count
    ) {
      throw new ProtocolError(
        `out-of-sequence tensor chunk from prev (rank ${prevRank}): expected op ${rx.op} phase ${rx.phase} chunk ${rx.chunk} ` +
          `offset ${offset} count ${count}, got op ${frame.op} phase ${frame.phase} chunk ${frame.chunk} ` +
          `offset ${frame.offset} count ${frame.count}`,
      );
    }
  }

  /** The blob chunk must be the next one of the blob prev forwards in this phase. */
  private checkBlob(rx: GatherRx, frame: BlobChunkFrame, prevRank: number): void {
    const owner = mod(this.rank - 1 - rx.phase, this.size);
    const where = `(op ${frame.op}, phase ${frame.phase}, owner ${frame.owner}, offset ${frame.offset})`;
    if (frame.op !== rx.op || frame.phase !== rx.phase || frame.owner !== owner) {
      throw new ProtocolError(
        `out-of-sequence blob chunk from prev (rank ${prevRank}): expected op ${rx.op} phase ${rx.phase} owner ${owner}, ` +
          `got op ${frame.op} phase ${frame.phase} owner ${frame.owner}`,
      );
    }
    if (rx.total < 0) {
      if (frame.total > this.maxBlobBytes) {
        throw new ProtocolError(`blob of rank ${owner} is ${frame.total} bytes, more than maxBlobBytes ${this.maxBlobBytes} ${where}`);
      }
      if (rx.phase === 0 && frame.total !== rx.size) {
        throw new ProtocolError(`blob of rank ${owner} is ${frame.total} bytes but its op frame announced ${rx.size} ${where}`);
      }
      rx.total = frame.total;
    } else if (frame.total !== rx.total) {
      throw new ProtocolError(`blob of rank ${owner} changed its length from ${rx.total} to ${frame.total} bytes ${where}`);
    }
    if (frame.offset !== rx.offset) {
      throw new ProtocolError(`non-contiguous blob chunk: expected offset ${rx.offset} ${where}`);
    }
    const length = Math.min(this.chunkBytes, rx.total - rx.offset);
    if (frame.length !== length) {
      throw new ProtocolError(`blob chunk carries ${frame.length} bytes, expected ${length} ${where}`);
    }
  }

  /** Bind prev's announced op to the local one; checks kind, count and codec before touching data. */
  private attach(rx: RxState, op: OpState): void {
    if (rx.kind !== op.kind) {
      throw new ProtocolError(`prev announced op ${rx.op} as ${rx.kind}, the local op is ${op.kind}`);
    }
    if (rx.kind === "allreduce" && op.kind === "allreduce") {
      if (rx.count !== op.data.length) {
        throw new ProtocolError(
          `prev announced op ${rx.op} with ${rx.count} elements, the local buffer has ${op.data.length}`,
        );
      }
      if (rx.codec !== op.codec) {
        throw new ProtocolError(`prev announced op ${rx.op} with codec ${rx.codec}, the local op uses ${op.codec}`);
      }
    }
    rx.target = op;
    op.rx = rx;
    const early = rx.early;
    rx.early = [];
    rx.earlyBytes = 0;
    for (const { frame, bytes } of early) this.apply(op, frame, bytes);
    if (rx.done) op.rxDone = true;
    this.wake(op);
    this.maybeFinish(op);
  }

  /** Use one validated frame: sum or decode it into the buffer, or collect a blob chunk. */
  private apply(op: OpState, frame: ChunkFrame | BlobChunkFrame, bytes: Uint8Array): void {
    if (frame.kind === "blob") {
      if (op.kind !== "allgather") throw new Error("internal: blob chunk applied to an all-reduce");
      const parts = op.parts[frame.owner];
      parts.push(frame.data);
      if (frame.offset + frame.length === frame.total) {
        op.blobs[frame.owner] = concatBytes(parts, frame.total);
        op.parts[frame.owner] = [];
      }
      if (frame.phase < this.size - 2) op.forward.push({ bytes, phase: frame.phase + 1 });
      this.wake(op);
      return;
    }
    if (op.kind !== "allreduce") throw new Error("internal: tensor chunk applied to an all-gather");
    const o = frame.offset;
    const reduce = frame.phase < this.size - 1;
    if (frame.dtype === "float32") {
      // summed by the SIMD kernels (codecs.ts) straight from the received bytes
      if (reduce) decodePayload("f32", bytes.subarray(CHUNK_HEADER_BYTES), op.data.subarray(o, o + frame.count), "add");
      else op.data.set(frame.data, o);
    } else {
      decodePayload(frame.codec, frame.payload, op.data.subarray(o, o + frame.count), reduce ? "add" : "set");
      // all-gather chunks travel on as the same bytes (only the phase changes)
      if (!reduce && frame.phase < this.phases - 1) op.forward.push({ bytes, phase: frame.phase + 1 });
    }
    this.wake(op);
  }

  // ---- send side ----------------------------------------------------------------

  private wake(op: OpState): void {
    const w = op.wake;
    op.wake = null;
    if (w) w();
  }

  private sleep(op: OpState): Promise<void> {
    return new Promise<void>((resolve) => {
      op.wake = resolve;
    });
  }

  /** Chunk c of phase p may go out: phase 0 at once, later phases once (p-1, c) arrived. */
  private ready(op: ReduceOp, phase: number, chunk: number): boolean {
    if (phase === 0) return true;
    const rx = op.rx;
    if (!rx) return false;
    return rx.phase > phase - 1 || (rx.phase === phase - 1 && rx.chunk > chunk);
  }

  private async send(op: OpState, bytes: Uint8Array, onWritten?: () => void): Promise<void> {
    op.bytesSent += bytes.byteLength;
    op.frames += 1;
    await this.next!.send(bytes, onWritten);
  }

  private async pumpReduce(op: ReduceOp): Promise<void> {
    const { codec } = op;
    await this.send(
      op,
      encodeControl({ t: "op", op: op.op, kind: "allreduce", count: op.data.length, dtype: "float32", codec }),
    );
    for (let p = 0; p < this.phases; p++) {
      const seg = op.segs[sentSegment(this.rank, p, this.size)];
      const n = chunksIn(seg.end - seg.start, op.chunkElems);
      for (let c = 0; c < n; c++) {
        while (!op.settled && !this.ready(op, p, c)) await this.sleep(op);
        if (op.settled) return;
        const offset = seg.start + c * op.chunkElems;
        const count = Math.min(op.chunkElems, seg.end - offset);
        const header = { phase: p, op: op.op, chunk: c, offset, count };
        let frame: Uint8Array;
        let onWritten: (() => void) | undefined;
        if (codec === "f32") {
          const buf = this.framePool.take();
          frame = encodeChunkInto(buf, header, op.data.subarray(offset, offset + count));
          onWritten = () => this.framePool.give(buf);
        } else if (p >= this.size) {
          frame = this.takeForward(op, p, c, offset);
        } else {
          frame = newChunkFrame(header, codec);
          const values = op.data.subarray(offset, offset + count);
          const payload = frame.subarray(CHUNK_HEADER_BYTES);
          encodePayload(codec, values, payload);
          // the segment's owner keeps what everyone else will decode
          if (p === this.size - 1) decodePayload(codec, payload, values, "set");
        }
        op.payloadBytes += frame.byteLength - CHUNK_HEADER_BYTES;
        await this.send(op, frame, onWritten);
        if (op.settled) return;
      }
    }
    op.sendDone = true;
    this.maybeFinish(op);
  }

  /** The received all-gather chunk (p-1, c), re-labelled as phase p. */
  private takeForward(op: OpState, phase: number, chunk: number, offset: number): Uint8Array {
    const entry = op.forward.shift();
    if (!entry || entry.phase !== phase) {
      throw new Error(`internal: no received chunk to forward as phase ${phase} chunk ${chunk}`);
    }
    const view = new DataView(entry.bytes.buffer, entry.bytes.byteOffset, entry.bytes.byteLength);
    if (view.getUint32(8, true) !== chunk || view.getUint32(12, true) !== offset) {
      throw new Error(`internal: forward queue out of step at phase ${phase} chunk ${chunk}`);
    }
    setFramePhase(entry.bytes, phase);
    return entry.bytes;
  }

  /** Every chunk this rank has to forward has arrived (phases 0 .. N-3 received). */
  private forwardsComplete(op: GatherOp): boolean {
    if (this.size <= 2) return true;
    const rx = op.rx;
    return rx !== null && (rx.done || rx.phase >= this.size - 2);
  }

  private async pumpGather(op: GatherOp): Promise<void> {
    const { blob } = op;
    const total = blob.byteLength;
    await this.send(op, encodeControl({ t: "op", op: op.op, kind: "allgather", size: total }));
    const n = Math.max(1, Math.ceil(total / this.chunkBytes));
    for (let c = 0; c < n; c++) {
      if (op.settled) return;
      const offset = c * this.chunkBytes;
      const length = Math.min(this.chunkBytes, total - offset);
      const frame = encodeBlobChunk(
        { phase: 0, op: op.op, owner: this.rank, total, offset, length },
        blob.subarray(offset, offset + length),
      );
      op.payloadBytes += length;
      await this.send(op, frame);
    }
    for (;;) {
      while (!op.settled && op.forward.length === 0 && !this.forwardsComplete(op)) await this.sleep(op);
      if (op.settled) return;
      const entry = op.forward.shift();
      if (!entry) break;
      setFramePhase(entry.bytes, entry.phase);
      op.payloadBytes += entry.bytes.byteLength - BLOB_HEADER_BYTES;
      await this.send(op, entry.bytes);
    }
    if (op.settled) return;
    op.sendDone = true;
    this.maybeFinish(op);
  }

  private maybeFinish(op: OpState): void {
    if (op.settled || !op.rxDone || !op.sendDone) return;
    op.settled = true;
    if (this.cur === op) this.cur = null;
    this.completed++;
    const stats: RingStats = {
      op: op.op,
      bytesSent: op.bytesSent,
      payloadBytes: op.payloadBytes,
      frames: op.frames,
      seconds: (performance.now() - op.started) / 1000,
    };
    if (op.kind === "allreduce") {
      op.resolve(stats);
      return;
    }
    const blobs = op.blobs.map((b, r) => {
      if (!b) throw new Error(`internal: all-gather op ${op.op} finished without the blob of rank ${r}`);
      return b;
    });
    op.resolve({ blobs, stats });
  }

  // ---- failure ------------------------------------------------------------------

  private violation(err: unknown): void {
    const e =
      err instanceof ProtocolError
        ? err
        : new ProtocolError(err instanceof Error ? err.message : String(err));
    this.fail(e, CLOSE_PROTOCOL);
  }

  /** Kill the ring: reject the op in flight, close both links. Idempotent. */
  private fail(err: Error, closeCode: number): void {
    if (this.dead) return;
    this.dead = err;
    for (const off of this.unsubscribe) off();
    this.unsubscribe.length = 0;
    this.prev?.close(closeCode, err.message);
    this.next?.close(closeCode, err.message);
    if (this.rx) this.rx.early = [];
    const op = this.cur;
    this.cur = null;
    if (op && !op.settled) {
      op.settled = true;
      op.forward = [];
      this.wake(op);
      op.reject(err);
    }
  }
}
