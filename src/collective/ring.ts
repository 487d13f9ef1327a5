/**
 * Ring all-reduce (sum, float32) over FrameLinks: reduce-scatter then all-gather,
 * chunked and pipelined. See docs/protocol.md, "Data plane (ring)".
 *
 * The buffer of L elements is cut into N segments (sizes differ by at most one). In
 * phase p (0 .. 2(N-1)-1) rank r sends segment (r - p) mod N to next and receives
 * segment (r - 1 - p) mod N from prev; phases 0 .. N-2 are the reduce-scatter (the
 * received chunk is added), phases N-1 .. 2N-3 the all-gather (it is copied). Each
 * segment travels as chunks of chunkBytes. Received chunk c of phase p is exactly what
 * rank r sends as chunk c of phase p+1, so the sender streams: a chunk goes out as soon
 * as it has been summed, while later chunks are still arriving.
 *
 * Flow control: received frames are always consumed at once (summed into the buffer,
 * never queued behind a send), and the sender reads the buffer only when the next link
 * has room (FrameLink backpressure). Nothing can deadlock and memory stays bounded.
 */
import { ProtocolError } from "../errors.js";
import type { FrameLink } from "../net/link.js";
import { CLOSE_ABORTED, CLOSE_PROTOCOL } from "../net/link.js";
import {
  type ChunkFrame,
  DEFAULT_CHUNK_BYTES,
  decodeFrame,
  encodeChunk,
  encodeControl,
  type Frame,
  MAX_CHUNK_BYTES,
} from "../protocol/frames.js";

export interface RingOptions {
  rank: number;
  size: number;
  /** Link to rank (rank + 1) mod size; null only when size is 1. */
  next: FrameLink | null;
  /** Link from rank (rank - 1) mod size; null only when size is 1. */
  prev: FrameLink | null;
  /** Payload bytes per chunk frame (multiple of 4); all members must use the same. */
  chunkBytes?: number;
  /** Cap on chunk bytes buffered for an op that prev started before we did. */
  maxBufferedBytes?: number;
}

export interface RingStats {
  op: number;
  /** Every byte this rank sent for the op, frame headers and the op frame included. */
  bytesSent: number;
  /** Tensor bytes this rank sent (count x 4 summed over its chunks). */
  payloadBytes: number;
  /** Frames sent, the op control frame included. */
  frames: number;
  seconds: number;
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

/** Tensor payload bytes rank sends in one all-reduce of L float32 values on N ranks. */
export function expectedBytesPerNode(length: number, size: number, rank: number): number {
  const segs = segmentBounds(length, size);
  let elems = 0;
  for (let p = 0; p < 2 * (size - 1); p++) {
    const s = segs[sentSegment(rank, p, size)];
    elems += s.end - s.start;
  }
  return elems * 4;
}

/** Receive-side cursor over one op's expected chunk sequence (from prev). */
interface RxState {
  op: number;
  count: number;
  segs: SegmentBounds[];
  /** next expected (phase, chunk); phase === phases when done */
  phase: number;
  chunk: number;
  done: boolean;
  /** chunks received before the local op started (validated, not yet applied) */
  early: ChunkFrame[];
  earlyBytes: number;
  target: OpState | null;
}

interface OpState {
  op: number;
  data: Float32Array;
  segs: SegmentBounds[];
  started: number;
  rx: RxState | null;
  rxDone: boolean;
  sendDone: boolean;
  settled: boolean;
  bytesSent: number;
  payloadBytes: number;
  frames: number;
  wake: (() => void) | null;
  resolve: (s: RingStats) => void;
  reject: (e: Error) => void;
}

export class RingAllReduce {
  readonly rank: number;
  readonly size: number;
  readonly chunkBytes: number;
  readonly chunkElems: number;
  private readonly next: FrameLink | null;
  private readonly prev: FrameLink | null;
  private readonly phases: number;
  private readonly maxBufferedBytes: number;
  /** op id the next local allReduce gets */
  private nextOp = 0;
  /** op id prev must announce next */
  private rxNextOp = 0;
  private cur: OpState | null = null;
  private rx: RxState | null = null;
  private dead: Error | null = null;
  private completed = 0;
  private readonly unsubscribe: Array<() => void> = [];

  constructor(opts: RingOptions) {
    const { rank, size } = opts;
    if (!Number.isInteger(size) || size < 1 || size > 32768) throw new RangeError(`bad ring size ${size}`);
    if (!Number.isInteger(rank) || rank < 0 || rank >= size) throw new RangeError(`bad rank ${rank} for ring of ${size}`);
    const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    if (!Number.isInteger(chunkBytes) || chunkBytes < 4 || chunkBytes % 4 !== 0 || chunkBytes > MAX_CHUNK_BYTES) {
      throw new RangeError(`chunkBytes must be a multiple of 4 in [4, ${MAX_CHUNK_BYTES}], got ${chunkBytes}`);
    }
    if (size > 1 && (!opts.next || !opts.prev)) {
      throw new Error(`ring of ${size} needs both next and prev links`);
    }
    this.rank = rank;
    this.size = size;
    this.chunkBytes = chunkBytes;
    this.chunkElems = chunkBytes / 4;
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

  /** Number of all-reduces completed. */
  get opsCompleted(): number {
    return this.completed;
  }

  /** Set once the ring has failed, been aborted or closed; every later op rejects with it. */
  get error(): Error | null {
    return this.dead;
  }

  /**
   * Sum `data` in place across all members. Ops are sequential: call again only after
   * the previous promise settled. Every member ends with bitwise identical values.
   * On failure the ring is dead (links closed) and the promise rejects: with
   * ProtocolError for a frame that broke the protocol (nothing from it was summed),
   * LinkLostError when a neighbour went away.
   */
  allReduce(data: Float32Array): Promise<RingStats> {
    if (!(data instanceof Float32Array)) return Promise.reject(new TypeError("allReduce takes a Float32Array"));
    if (this.dead) return Promise.reject(this.dead);
    if (this.cur) return Promise.reject(new Error("allReduce already in progress: ops are sequential"));
    if (data.length > 0xffffffff) return Promise.reject(new RangeError("buffer too large for the ring protocol"));
    const op = this.nextOp++;
    const started = performance.now();
    if (this.size === 1) {
      this.completed++;
      return Promise.resolve({ op, bytesSent: 0, payloadBytes: 0, frames: 0, seconds: (performance.now() - started) / 1000 });
    }
    return new Promise<RingStats>((resolve, reject) => {
      const state: OpState = {
        op,
        data,
        segs: segmentBounds(data.length, this.size),
        started,
        rx: null,
        rxDone: false,
        sendDone: false,
        settled: false,
        bytesSent: 0,
        payloadBytes: 0,
        frames: 0,
        wake: null,
        resolve,
        reject,
      };
      this.cur = state;
      if (this.rx && this.rx.op === op) {
        try {
          this.attach(this.rx, state);
        } catch (err) {
          this.violation(err);
          return;
        }
      }
      this.pump(state).catch((err: unknown) => {
        if (state.settled) return;
        this.fail(err instanceof Error ? err : new Error(String(err)), CLOSE_PROTOCOL);
      });
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

  // ---- receive side -------------------------------------------------------------

  private chunksIn(seg: SegmentBounds): number {
    const len = seg.end - seg.start;
    return len === 0 ? 0 : Math.ceil(len / this.chunkElems);
  }

  /** Segment received in `phase` from prev. */
  private rxSegment(segs: SegmentBounds[], phase: number): SegmentBounds {
    return segs[sentSegment(mod(this.rank - 1, this.size), phase, this.size)];
  }

  /** Skip past finished (or empty) phases. */
  private normalize(rx: RxState): void {
    while (rx.phase < this.phases && rx.chunk >= this.chunksIn(this.rxSegment(rx.segs, rx.phase))) {
      rx.phase++;
      rx.chunk = 0;
    }
    rx.done = rx.phase >= this.phases;
  }

  private onPrevFrame(bytes: Uint8Array): void {
    if (this.dead) return;
    try {
      this.handleFrame(decodeFrame(bytes));
    } catch (err) {
      this.violation(err);
    }
  }

  private handleFrame(frame: Frame): void {
    const prevRank = mod(this.rank - 1, this.size);
    if (frame.kind === "control") {
      const m = frame.msg;
      if (m.t !== "op") throw new ProtocolError(`unexpected "${m.t}" control frame from prev (rank ${prevRank})`);
      if (this.rx && !this.rx.done) {
        throw new ProtocolError(`prev announced op ${m.op} before finishing op ${this.rx.op}`);
      }
      if (this.rx && this.rx.target === null) {
        throw new ProtocolError(`prev announced op ${m.op} while op ${this.rx.op} is still buffered (more than one op ahead)`);
      }
      if (m.op !== this.rxNextOp) {
        throw new ProtocolError(`prev announced op ${m.op}, expected op ${this.rxNextOp}`);
      }
      const rx: RxState = {
        op: m.op,
        count: m.count,
        segs: segmentBounds(m.count, this.size),
        phase: 0,
        chunk: 0,
        done: false,
        early: [],
        earlyBytes: 0,
        target: null,
      };
      this.normalize(rx);
      this.rxNextOp++;
      this.rx = rx;
      if (this.cur && this.cur.op === m.op) this.attach(rx, this.cur);
      return;
    }

    const rx = this.rx;
    if (!rx || rx.done) {
      throw new ProtocolError(
        `tensor chunk (op ${frame.op}, phase ${frame.phase}, chunk ${frame.chunk}) without an op announcement`,
      );
    }
    const seg = this.rxSegment(rx.segs, rx.phase);
    const offset = seg.start + rx.chunk * this.chunkElems;
    const count = Math.min(this.chunkElems, seg.end - offset);
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
    if (rx.target) {
      this.apply(rx.target, frame);
    } else {
      if (rx.earlyBytes + frame.count * 4 > this.maxBufferedBytes) {
        throw new ProtocolError(`prev sent more than ${this.maxBufferedBytes} bytes ahead of the local op`);
      }
      rx.early.push(frame);
      rx.earlyBytes += frame.count * 4;
    }
    rx.chunk++;
    this.normalize(rx);
    if (rx.done && rx.target) {
      rx.target.rxDone = true;
      this.maybeFinish(rx.target);
    }
  }

  /** Bind prev's announced op to the local one; checks the count before touching data. */
  private attach(rx: RxState, op: OpState): void {
    if (rx.count !== op.data.length) {
      throw new ProtocolError(
        `prev announced op ${rx.op} with ${rx.count} elements, the local buffer has ${op.data.length}`,
      );
    }
    rx.target = op;
    op.rx = rx;
    const early = rx.early;
    rx.early = [];
    rx.earlyBytes = 0;
    for (const frame of early) this.apply(op, frame);
    if (rx.done) op.rxDone = true;
    this.wake(op);
    this.maybeFinish(op);
  }

  /** Sum (reduce-scatter) or copy (all-gather) one validated chunk into the buffer. */
  private apply(op: OpState, frame: ChunkFrame): void {
    const dst = op.data;
    const src = frame.data;
    const o = frame.offset;
    if (frame.phase < this.size - 1) {
      for (let i = 0, n = src.length; i < n; i++) dst[o + i] += src[i];
    } else {
      dst.set(src, o);
    }
    this.wake(op);
  }

  // ---- send side ----------------------------------------------------------------

  private wake(op: OpState): void {
    const w = op.wake;
    op.wake = null;
    if (w) w();
  }

  /** Chunk c of phase p may go out: phase 0 at once, later phases once (p-1, c) arrived. */
  private ready(op: OpState, phase: number, chunk: number): boolean {
    if (phase === 0) return true;
    const rx = op.rx;
    if (!rx) return false;
    return rx.phase > phase - 1 || (rx.phase === phase - 1 && rx.chunk > chunk);
  }

  private async send(op: OpState, bytes: Uint8Array): Promise<void> {
    op.bytesSent += bytes.byteLength;
    op.frames += 1;
    await this.next!.send(bytes);
  }

  private async pump(op: OpState): Promise<void> {
    await this.send(op, encodeControl({ t: "op", op: op.op, count: op.data.length, dtype: "float32" }));
    for (let p = 0; p < this.phases; p++) {
      const seg = op.segs[sentSegment(this.rank, p, this.size)];
      const n = this.chunksIn(seg);
      for (let c = 0; c < n; c++) {
        while (!op.settled && !this.ready(op, p, c)) {
          await new Promise<void>((resolve) => {
            op.wake = resolve;
          });
        }
        if (op.settled) return;
        const offset = seg.start + c * this.chunkElems;
        const count = Math.min(this.chunkElems, seg.end - offset);
        const frame = encodeChunk({ phase: p, op: op.op, chunk: c, offset, count }, op.data.subarray(offset, offset + count));
        op.payloadBytes += count * 4;
        await this.send(op, frame);
        if (op.settled) return;
      }
    }
    op.sendDone = true;
    this.maybeFinish(op);
  }

  private maybeFinish(op: OpState): void {
    if (op.settled || !op.rxDone || !op.sendDone) return;
    op.settled = true;
    if (this.cur === op) this.cur = null;
    this.completed++;
    op.resolve({
      op: op.op,
      bytesSent: op.bytesSent,
      payloadBytes: op.payloadBytes,
      frames: op.frames,
      seconds: (performance.now() - op.started) / 1000,
    });
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
      this.wake(op);
      op.reject(err);
    }
  }
}
