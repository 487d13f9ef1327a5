/**
 * Direct (butterfly) all-reduce (sum, float32) over a link to and from every other member.
 * See docs/protocol.md, "Data plane (direct all-reduce)".
 *
 * The buffer of L elements is cut into N segments as the ring cuts it (segmentBounds);
 * member p owns segment p. Two hops:
 * - reduce-scatter (phase 0): every member sends each other member q its values of
 *   segment q, straight to q. The owner sums the N contributions of each chunk in rank
 *   (position) order, 0 first, whatever order they arrive in, so the sum does not depend
 *   on timing: ((x0 + x1) + x2) + ... rounded to float32 at each step.
 * - all-gather (phase 1): the owner sends each reduced chunk of its segment to every other
 *   member, as the very same bytes, as soon as that chunk's N contributions are in.
 * Each member sends 2(N-1)/N of the buffer, as the ring does, but over N-1 links at once
 * and in 2 hops instead of 2(N-1): latency-optimal, for the small all-reduces where the
 * ring's 2(N-1) hops cost more than its bytes.
 *
 * On the link from p to q travel, in order: p's op announcement (the ring's op frame), the
 * phase-0 chunks of segment q (chunk 0, 1, ...), then the phase-1 chunks of segment p.
 * Chunks are the ring's tensor chunk frames (offset and count name the elements), of at
 * most chunkBytes wire bytes.
 *
 * Wire codecs as in the ring (codecs.ts): contributions are encoded from the sender's
 * float32 values (the owner's own contribution is used as it is); the owner replaces its
 * reduced chunk by decode(encode(sum)) and sends those bytes, which every member decodes
 * into the same bits: all replicas end bitwise identical, whatever the codec.
 *
 * Flow control: received frames are consumed at once (summed, set, or held for their
 * turn in the rank order), never queued behind a send; each link's sender waits on that
 * link's backpressure. Held frames are at most what peers send for this op (the
 * contributions to this member's segment) plus, before the local op starts, at most
 * maxBufferedBytes of frames of a peer that started first (one op ahead at most).
 *
 * Failure: a frame that breaks the protocol rejects the op with ProtocolError (nothing
 * from it was used) and closes every link with CLOSE_PROTOCOL; a link that closes rejects
 * it with a LinkLostError naming the peer. Either way the all-reduce is dead afterwards,
 * as a ring is: the mesh makes a new one when the links re-form.
 */
import { ProtocolError } from "../errors.js";
import type { FrameLink } from "../net/link.js";
import { CLOSE_ABORTED, CLOSE_PROTOCOL, LinkClosedError } from "../net/link.js";
import {
  CHUNK_HEADER_BYTES,
  type ChunkFrame,
  chunkCodec,
  DEFAULT_CHUNK_BYTES,
  decodeFrame,
  encodeChunk,
  encodeControl,
  MAX_CHUNK_BYTES,
  newChunkFrame,
  WIRE_CODECS,
  type WireCodec,
  wirePayloadBytes,
} from "../protocol/frames.js";
import { chunkElements, decodePayload, encodePayload } from "./codecs.js";
import { type AllReduceOptions, DEFAULT_MAX_BUFFERED_BYTES, LinkLostError, type RingStats, type SegmentBounds, segmentBounds } from "./ring.js";

/** Phase of a contribution to the owner (reduce-scatter) and of the owner's result (all-gather). */
export const PHASE_CONTRIBUTE = 0;
export const PHASE_RESULT = 1;

/** The links between this member and one other. */
export interface DirectPeer {
  /** The peer's position, 0 .. size-1 (its segment). */
  position: number;
  /** Its rank in the job, for messages (default: its position). */
  rank?: number;
  /** Link we send on, to the peer. */
  send: FrameLink;
  /** Link we receive on, from the peer. */
  recv: FrameLink;
}

export interface DirectOptions {
  /** This member's position, 0 .. size-1. */
  position: number;
  size: number;
  /** One entry per other member (size - 1 of them). */
  peers: readonly DirectPeer[];
  /** Wire payload bytes per chunk frame (multiple of 4); all members must use the same. */
  chunkBytes?: number;
  /** Cap on chunk bytes held for an op that peers started before we did. */
  maxBufferedBytes?: number;
}

/** A peer's link closed: `neighbour` is "prev" for the link from it, "next" for the link to it. */
export class PeerLostError extends LinkLostError {
  constructor(neighbour: "prev" | "next", peerRank: number, code: number, reason: string) {
    super(neighbour, peerRank, code, reason);
    this.message = `direct all-reduce peer rank ${peerRank} disconnected (the link ${neighbour === "prev" ? "from" : "to"} it, code ${code}${reason ? `: ${reason}` : ""})`;
  }
}

function chunksIn(len: number, per: number): number {
  return len === 0 ? 0 : Math.ceil(len / per);
}

/**
 * Wire payload bytes `position` sends in one direct all-reduce of L float32 values on N
 * members: every other segment once (to its owner), its own (N-1) times.
 */
export function expectedDirectBytesPerNode(length: number, size: number, position: number, codec: WireCodec = "f32", chunkBytes: number = DEFAULT_CHUNK_BYTES): number {
  let bytes = 0;
  forEachDirectChunk(length, size, position, codec, chunkBytes, (count, copies) => {
    bytes += copies * wirePayloadBytes(codec, count);
  });
  return bytes;
}

/** Every byte `position` sends in one direct all-reduce: N-1 op frames, chunk headers and payloads (0 when N is 1). */
export function expectedDirectFrameBytesPerNode(length: number, size: number, position: number, codec: WireCodec = "f32", chunkBytes: number = DEFAULT_CHUNK_BYTES): number {
  if (size === 1) return 0;
  let bytes = (size - 1) * encodeControl({ t: "op", op: 0, kind: "allreduce", count: length, dtype: "float32", codec }).byteLength;
  forEachDirectChunk(length, size, position, codec, chunkBytes, (count, copies) => {
    bytes += copies * (CHUNK_HEADER_BYTES + wirePayloadBytes(codec, count));
  });
  return bytes;
}

function forEachDirectChunk(length: number, size: number, position: number, codec: WireCodec, chunkBytes: number, visit: (count: number, copies: number) => void): void {
  const segs = segmentBounds(length, size);
  const per = chunkElements(codec, chunkBytes);
  for (let s = 0; s < size; s++) {
    const len = segs[s].end - segs[s].start;
    const copies = s === position ? size - 1 : 1;
    for (let c = 0; c < Math.floor(len / per); c++) visit(per, copies);
    if (len % per !== 0) visit(len % per, copies);
  }
}

interface Early {
  frame: ChunkFrame;
  bytes: Uint8Array;
}

/** What one peer has sent of one op, checked frame by frame against what it must send. */
interface PeerRx {
  op: number;
  count: number;
  codec: WireCodec;
  chunkElems: number;
  segs: SegmentBounds[];
  /** next expected phase (PHASE_CONTRIBUTE, PHASE_RESULT; 2 when done) and chunk in it */
  phase: number;
  chunk: number;
  done: boolean;
  early: Early[];
  earlyBytes: number;
  target: DirectOp | null;
  /** counted in its op's peersDone */
  counted: boolean;
}

interface PeerState {
  position: number;
  rank: number;
  send: FrameLink;
  recv: FrameLink;
  /** op id this peer must announce next */
  rxNextOp: number;
  rx: PeerRx | null;
}

interface OwnChunk {
  offset: number;
  count: number;
  /** next position whose contribution is added */
  next: number;
  /** contributions that came before their turn, by position */
  held: Array<ChunkFrame | null>;
  acc: Float32Array | null;
  reduced: boolean;
  /** the reduced chunk's frame, as every peer gets it, until all have been sent it */
  result: Uint8Array | null;
  sends: number;
}

interface DirectOp {
  op: number;
  started: number;
  data: Float32Array;
  codec: WireCodec;
  chunkElems: number;
  segs: SegmentBounds[];
  own: OwnChunk[];
  /** own chunks reduced so far (they finish in any order: each waits on its own contributions) */
  reduced: number;
  /** peers whose frames of this op have all come */
  peersDone: number;
  pumpsLeft: number;
  settled: boolean;
  bytesSent: number;
  payloadBytes: number;
  frames: number;
  /** pumps waiting for a result chunk */
  waiters: Array<() => void>;
  resolve: (s: RingStats) => void;
  reject: (e: Error) => void;
}

export class DirectAllReduce {
  readonly position: number;
  readonly size: number;
  readonly chunkBytes: number;
  readonly maxBufferedBytes: number;
  readonly algorithm = "direct" as const;
  readonly #peers: PeerState[];
  /** by position (null at our own) */
  readonly #byPosition: Array<PeerState | null>;
  #nextOp = 0;
  #cur: DirectOp | null = null;
  #dead: Error | null = null;
  #completed = 0;
  readonly #unsubscribe: Array<() => void> = [];

  constructor(opts: DirectOptions) {
    const { position, size } = opts;
    if (!Number.isInteger(size) || size < 1 || size > 4096) throw new RangeError(`bad direct all-reduce size ${size}`);
    if (!Number.isInteger(position) || position < 0 || position >= size) throw new RangeError(`bad position ${position} of ${size}`);
    const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    if (!Number.isInteger(chunkBytes) || chunkBytes < 4 || chunkBytes % 4 !== 0 || chunkBytes > MAX_CHUNK_BYTES) {
      throw new RangeError(`chunkBytes must be a multiple of 4 in [4, ${MAX_CHUNK_BYTES}], got ${chunkBytes}`);
    }
    const seen = new Set<number>();
    for (const p of opts.peers) {
      if (!Number.isInteger(p.position) || p.position < 0 || p.position >= size || p.position === position || seen.has(p.position)) {
        throw new RangeError(`bad peer position ${p.position} for member ${position} of ${size}`);
      }
      seen.add(p.position);
    }
    if (seen.size !== size - 1) throw new Error(`a direct all-reduce of ${size} needs links to all ${size - 1} other members, got ${seen.size}`);
    this.position = position;
    this.size = size;
    this.chunkBytes = chunkBytes;
    this.maxBufferedBytes = opts.maxBufferedBytes ?? DEFAULT_MAX_BUFFERED_BYTES;
    this.#peers = [...opts.peers]
      .sort((a, b) => a.position - b.position)
      .map((p) => ({ position: p.position, rank: p.rank ?? p.position, send: p.send, recv: p.recv, rxNextOp: 0, rx: null }));
    this.#byPosition = Array.from({ length: size }, () => null);
    for (const peer of this.#peers) {
      this.#byPosition[peer.position] = peer;
      this.#unsubscribe.push(
        peer.recv.onFrame((bytes) => this.#onFrame(peer, bytes)),
        peer.send.onFrame(() => this.#violation(new ProtocolError(`unexpected frame from rank ${peer.rank} on the link to it: direct links are one-way`))),
        peer.recv.onClose((code, reason) => this.#fail(new PeerLostError("prev", peer.rank, code, reason), CLOSE_ABORTED)),
        peer.send.onClose((code, reason) => this.#fail(new PeerLostError("next", peer.rank, code, reason), CLOSE_ABORTED)),
      );
    }
  }

  get opsCompleted(): number {
    return this.#completed;
  }

  /** Set once it has failed, been aborted or closed; every later op rejects with it. */
  get error(): Error | null {
    return this.#dead;
  }

  /**
   * Sum `data` in place across all members (RingAllReduce.allReduce's contract: sequential
   * ops, bitwise identical results, ProtocolError / LinkLostError on failure, after which it
   * is dead). Alone (size 1) it sends nothing and leaves `data` as it is.
   */
  allReduce(data: Float32Array, opts: AllReduceOptions = {}): Promise<RingStats> {
    if (!(data instanceof Float32Array)) return Promise.reject(new TypeError("allReduce takes a Float32Array"));
    const codec = opts.codec ?? "f32";
    if (!WIRE_CODECS.includes(codec)) return Promise.reject(new TypeError(`unknown wire codec ${String(codec)}`));
    if (this.#dead) return Promise.reject(this.#dead);
    if (this.#cur) return Promise.reject(new Error("a direct all-reduce is already in progress: ops are sequential"));
    if (data.length > 0xffffffff) return Promise.reject(new RangeError("buffer too large for the data-plane protocol"));
    const op = this.#nextOp++;
    const started = performance.now();
    if (this.size === 1) {
      this.#completed++;
      return Promise.resolve({ op, bytesSent: 0, payloadBytes: 0, frames: 0, seconds: (performance.now() - started) / 1000 });
    }
    return new Promise<RingStats>((resolve, reject) => {
      const chunkElems = chunkElements(codec, this.chunkBytes);
      const segs = segmentBounds(data.length, this.size);
      const mine = segs[this.position];
      const own: OwnChunk[] = [];
      for (let c = 0; c < chunksIn(mine.end - mine.start, chunkElems); c++) {
        const offset = mine.start + c * chunkElems;
        own.push({ offset, count: Math.min(chunkElems, mine.end - offset), next: 0, held: new Array(this.size).fill(null), acc: null, reduced: false, result: null, sends: 0 });
      }
      const state: DirectOp = {
        op,
        started,
        data,
        codec,
        chunkElems,
        segs,
        own,
        reduced: 0,
        peersDone: 0,
        pumpsLeft: this.#peers.length,
        settled: false,
        bytesSent: 0,
        payloadBytes: 0,
        frames: 0,
        waiters: [],
        resolve,
        reject,
      };
      this.#cur = state;
      try {
        for (const peer of this.#peers) if (peer.rx && peer.rx.op === op) this.#attach(peer, peer.rx, state);
        // Our own contribution may complete chunks whose peers' contributions all came early.
        for (let c = 0; c < own.length; c++) this.#advance(state, c);
      } catch (err) {
        this.#violation(err);
        return;
      }
      for (const peer of this.#peers) this.#runPump(state, peer);
      this.#maybeFinish(state);
    });
  }

  /** Reject the op in flight and close every link: unusable afterwards. */
  abort(reason: string): void {
    this.#fail(new Error(`direct all-reduce aborted: ${reason}`), CLOSE_ABORTED);
  }

  close(): void {
    this.#fail(new Error("direct all-reduce closed"), 1000);
  }

  // ---- receive side -------------------------------------------------------------

  #onFrame(peer: PeerState, bytes: Uint8Array): void {
    if (this.#dead) return;
    try {
      this.#handle(peer, decodeFrame(bytes), bytes);
    } catch (err) {
      this.#violation(err);
    }
  }

  #handle(peer: PeerState, frame: ReturnType<typeof decodeFrame>, bytes: Uint8Array): void {
    const from = `rank ${peer.rank}`;
    if (frame.kind === "control") {
      const m = frame.msg;
      if (m.t !== "op") throw new ProtocolError(`unexpected "${m.t}" control frame from ${from}`);
      if (m.kind === "allgather" || m.kind === "pipe") throw new ProtocolError(`a ${m.kind} op from ${from} on a direct all-reduce link`);
      const rx = peer.rx;
      if (rx && !rx.done) throw new ProtocolError(`${from} announced op ${m.op} before finishing op ${rx.op}`);
      if (rx && rx.target === null) throw new ProtocolError(`${from} announced op ${m.op} while op ${rx.op} is still held (more than one op ahead)`);
      if (m.op !== peer.rxNextOp) throw new ProtocolError(`${from} announced op ${m.op}, expected op ${peer.rxNextOp}`);
      const codec = m.codec ?? "f32";
      const next: PeerRx = {
        op: m.op,
        count: m.count,
        codec,
        chunkElems: chunkElements(codec, this.chunkBytes),
        segs: segmentBounds(m.count, this.size),
        phase: PHASE_CONTRIBUTE,
        chunk: 0,
        done: false,
        early: [],
        earlyBytes: 0,
        target: null,
        counted: false,
      };
      this.#normalize(peer, next);
      peer.rxNextOp++;
      peer.rx = next;
      const cur = this.#cur;
      if (cur && cur.op === m.op) {
        this.#attach(peer, next, cur);
        this.#maybeFinish(cur);
      }
      return;
    }
    const rx = peer.rx;
    if (frame.kind !== "chunk") throw new ProtocolError(`blob chunk from ${from} on a direct all-reduce link`);
    if (!rx || rx.done) throw new ProtocolError(`tensor chunk (op ${frame.op}, phase ${frame.phase}, chunk ${frame.chunk}) from ${from} without an op announcement`);
    this.#check(peer, rx, frame);
    if (rx.target) this.#apply(rx.target, peer, frame);
    else {
      const wire = bytes.byteLength - CHUNK_HEADER_BYTES;
      if (rx.earlyBytes + wire > this.maxBufferedBytes) throw new ProtocolError(`${from} sent more than ${this.maxBufferedBytes} bytes ahead of the local op`);
      rx.early.push({ frame, bytes });
      rx.earlyBytes += wire;
    }
    rx.chunk++;
    this.#normalize(peer, rx);
    if (rx.target) {
      this.#count(rx);
      this.#maybeFinish(rx.target);
    }
  }

  /** A peer's frames of an attached op have all come: count it once. */
  #count(rx: PeerRx): void {
    if (!rx.done || rx.counted || !rx.target) return;
    rx.counted = true;
    rx.target.peersDone++;
  }

  /** The segment a peer's frames of `phase` carry: ours (contributions), then its own (results). */
  #segmentOf(peer: PeerState, rx: PeerRx, phase: number): SegmentBounds {
    return rx.segs[phase === PHASE_CONTRIBUTE ? this.position : peer.position];
  }

  #normalize(peer: PeerState, rx: PeerRx): void {
    while (rx.phase <= PHASE_RESULT) {
      const seg = this.#segmentOf(peer, rx, rx.phase);
      if (rx.chunk < chunksIn(seg.end - seg.start, rx.chunkElems)) break;
      rx.phase++;
      rx.chunk = 0;
    }
    rx.done = rx.phase > PHASE_RESULT;
  }

  /** The chunk must be exactly the next one expected from this peer, in the announced codec. */
  #check(peer: PeerState, rx: PeerRx, frame: ChunkFrame): void {
    const codec = chunkCodec(frame);
    if (codec !== rx.codec) {
      throw new ProtocolError(`tensor chunk from rank ${peer.rank} is ${codec} but op ${rx.op} was announced as ${rx.codec} (op ${frame.op}, phase ${frame.phase}, chunk ${frame.chunk})`);
    }
    const seg = this.#segmentOf(peer, rx, rx.phase);
    const offset = seg.start + rx.chunk * rx.chunkElems;
    const count = Math.min(rx.chunkElems, seg.end - offset);
    if (frame.op !== rx.op || frame.phase !== rx.phase || frame.chunk !== rx.chunk || frame.offset !== offset || frame.count !== count) {
      throw new ProtocolError(
        `out-of-sequence tensor chunk from rank ${peer.rank}: expected op ${rx.op} phase ${rx.phase} chunk ${rx.chunk} offset ${offset} count ${count}, ` +
          `got op ${frame.op} phase ${frame.phase} chunk ${frame.chunk} offset ${frame.offset} count ${frame.count}`,
      );
    }
  }

  /** Bind a peer's announced op to the local one (count and codec must agree), then use what it sent early. */
  #attach(peer: PeerState, rx: PeerRx, op: DirectOp): void {
    if (rx.count !== op.data.length) throw new ProtocolError(`rank ${peer.rank} announced op ${rx.op} with ${rx.count} elements, the local buffer has ${op.data.length}`);
    if (rx.codec !== op.codec) throw new ProtocolError(`rank ${peer.rank} announced op ${rx.op} with codec ${rx.codec}, the local op uses ${op.codec}`);
    rx.target = op;
    const early = rx.early;
    rx.early = [];
    rx.earlyBytes = 0;
    for (const e of early) this.#apply(op, peer, e.frame);
    this.#count(rx);
  }

  /** A validated chunk: a contribution to one of our chunks, or a result of the peer's segment. */
  #apply(op: DirectOp, peer: PeerState, frame: ChunkFrame): void {
    if (frame.phase === PHASE_RESULT) {
      const dst = op.data.subarray(frame.offset, frame.offset + frame.count);
      if (frame.dtype === "float32") dst.set(frame.data);
      else decodePayload(frame.codec, frame.payload, dst, "set");
      return;
    }
    const c = frame.chunk;
    op.own[c].held[peer.position] = frame;
    this.#advance(op, c);
  }

  /** Add the contributions of chunk c whose turn has come (positions in order); reduced: its result goes out. */
  #advance(op: DirectOp, c: number): void {
    const own = op.own[c];
    if (own.reduced) return;
    while (own.next < this.size) {
      const p = own.next;
      if (p === this.position) {
        this.#add(own, op.data.subarray(own.offset, own.offset + own.count), null, op.codec);
      } else {
        const frame = own.held[p];
        if (!frame) return;
        own.held[p] = null;
        this.#add(own, frame.dtype === "float32" ? frame.data : null, frame.dtype === "float32" ? null : frame.payload, op.codec);
      }
      own.next++;
    }
    own.reduced = true;
    this.#finishChunk(op, c);
  }

  #add(own: OwnChunk, values: Float32Array | null, payload: Uint8Array | null, codec: WireCodec): void {
    if (!own.acc) {
      own.acc = new Float32Array(own.count);
      if (values) own.acc.set(values);
      else decodePayload(codec, payload!, own.acc, "set");
      return;
    }
    if (values) {
      const acc = own.acc;
      for (let i = 0, n = acc.length; i < n; i++) acc[i] += values[i];
    } else decodePayload(codec, payload!, own.acc, "add");
  }

  /** Chunk c is reduced: the owner keeps what every peer will decode, and its frame goes to all of them. */
  #finishChunk(op: DirectOp, c: number): void {
    const own = op.own[c];
    const sum = own.acc!;
    own.acc = null;
    const header = { phase: PHASE_RESULT, op: op.op, chunk: c, offset: own.offset, count: own.count };
    const dst = op.data.subarray(own.offset, own.offset + own.count);
    if (op.codec === "f32") {
      own.result = encodeChunk(header, sum);
      dst.set(sum);
    } else {
      own.result = newChunkFrame(header, op.codec);
      const payload = own.result.subarray(CHUNK_HEADER_BYTES);
      encodePayload(op.codec, sum, payload);
      decodePayload(op.codec, payload, dst, "set");
    }
    op.reduced++;
    const waiters = op.waiters;
    op.waiters = [];
    for (const w of waiters) w();
  }

  // ---- send side ----------------------------------------------------------------

  #runPump(op: DirectOp, peer: PeerState): void {
    this.#pump(op, peer).then(
      () => {
        if (op.settled) return;
        op.pumpsLeft--;
        this.#maybeFinish(op);
      },
      (err: unknown) => {
        if (op.settled) return;
        const e = err instanceof Error ? err : new Error(String(err));
        if (e instanceof LinkClosedError) {
          // A send on a link that is closing: its close, naming the peer, follows (over
          // TLS the socket ends before ws reports the close).
          const timer = setTimeout(() => this.#fail(e, CLOSE_PROTOCOL), 2000);
          peer.send.onClose(() => clearTimeout(timer));
          return;
        }
        this.#fail(e, CLOSE_PROTOCOL);
      },
    );
  }

  async #send(op: DirectOp, link: FrameLink, bytes: Uint8Array, payload: number): Promise<void> {
    op.bytesSent += bytes.byteLength;
    op.payloadBytes += payload;
    op.frames += 1;
    await link.send(bytes);
  }

  /** The op frame, the peer's segment of our values, then our reduced chunks as they are ready. */
  async #pump(op: DirectOp, peer: PeerState): Promise<void> {
    const { codec, data } = op;
    await this.#send(op, peer.send, encodeControl({ t: "op", op: op.op, kind: "allreduce", count: data.length, dtype: "float32", codec }), 0);
    const seg = op.segs[peer.position];
    for (let c = 0, n = chunksIn(seg.end - seg.start, op.chunkElems); c < n; c++) {
      if (op.settled) return;
      const offset = seg.start + c * op.chunkElems;
      const count = Math.min(op.chunkElems, seg.end - offset);
      const header = { phase: PHASE_CONTRIBUTE, op: op.op, chunk: c, offset, count };
      const values = data.subarray(offset, offset + count);
      let frame: Uint8Array;
      if (codec === "f32") frame = encodeChunk(header, values);
      else {
        frame = newChunkFrame(header, codec);
        encodePayload(codec, values, frame.subarray(CHUNK_HEADER_BYTES));
      }
      await this.#send(op, peer.send, frame, frame.byteLength - CHUNK_HEADER_BYTES);
    }
    for (let c = 0; c < op.own.length; c++) {
      const own = op.own[c];
      while (!op.settled && !own.result) await new Promise<void>((resolve) => op.waiters.push(resolve));
      if (op.settled) return;
      const frame = own.result!;
      if (++own.sends === this.#peers.length) own.result = null; // the last peer's copy: let it go once sent
      await this.#send(op, peer.send, frame, frame.byteLength - CHUNK_HEADER_BYTES);
    }
  }

  #maybeFinish(op: DirectOp): void {
    if (op.settled || op.pumpsLeft > 0 || op.reduced < op.own.length || op.peersDone < this.#peers.length) return;
    op.settled = true;
    if (this.#cur === op) this.#cur = null;
    this.#completed++;
    op.resolve({ op: op.op, bytesSent: op.bytesSent, payloadBytes: op.payloadBytes, frames: op.frames, seconds: (performance.now() - op.started) / 1000 });
  }

  // ---- failure ------------------------------------------------------------------

  #violation(err: unknown): void {
    const e = err instanceof ProtocolError ? err : new ProtocolError(err instanceof Error ? err.message : String(err));
    this.#fail(e, CLOSE_PROTOCOL);
  }

  /** Kill it: reject the op in flight, close every link. Idempotent. */
  #fail(err: Error, closeCode: number): void {
    if (this.#dead) return;
    this.#dead = err;
    for (const off of this.#unsubscribe) off();
    this.#unsubscribe.length = 0;
    for (const peer of this.#peers) {
      peer.recv.close(closeCode, err.message);
      peer.send.close(closeCode, err.message);
      if (peer.rx) peer.rx.early = [];
    }
    const op = this.#cur;
    this.#cur = null;
    if (op && !op.settled) {
      op.settled = true;
      for (const own of op.own) {
        own.held.fill(null);
        own.acc = null;
        own.result = null;
      }
      const waiters = op.waiters;
      op.waiters = [];
      for (const w of waiters) w();
      op.reject(err);
    }
  }
}
