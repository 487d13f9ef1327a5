import { ProtocolError } from "../errors.js";
import type { FrameLink } from "../net/link.js";
import { CLOSE_ABORTED, CLOSE_PROTOCOL } from "../net/link.js";
import { BLOB_HEADER_BYTES, DEFAULT_CHUNK_BYTES, decodeFrame, encodeBlobChunk, encodeControl } from "../protocol/frames.js";
import { LinkLostError } from "./ring.js";

/** The largest single message a pipe accepts (an activation or its gradient). */
export const DEFAULT_MAX_PIPE_MESSAGE_BYTES = 1024 * 1024 * 1024;
/** Received messages no one asked for yet, in bytes, above which the sender breaks the protocol. */
export const DEFAULT_MAX_PIPE_BUFFERED_BYTES = 2 * 1024 * 1024 * 1024;

export interface PipeOptions {
  /** This end's rank and the other end's (for messages). */
  rank: number;
  peer: number;
  /** Link to the peer (we send on it); null only for a pipe to oneself, which has none. */
  next: FrameLink | null;
  /** Link from the peer (we receive on it). */
  prev: FrameLink | null;
  chunkBytes?: number;
  maxMessageBytes?: number;
  maxBufferedBytes?: number;
}

export interface PipeSendStats {
  /** Every byte sent for the message, frame headers included. */
  bytesSent: number;
  frames: number;
}

interface Incoming {
  op: number;
  tag: string;
  size: number;
  parts: Uint8Array[];
  got: number;
}

/**
 * A point-to-point channel between two ranks (consecutive pipeline stages): messages of
 * bytes, each under a tag, sent in order on the link to the peer and collected from the
 * link back. A message that arrives before anyone asks for it waits in a mailbox, bounded;
 * a tag asked for twice, a message over the bound or a malformed frame breaks the pipe.
 * Like a ring, it is dead after any failure: the mesh re-forms it by epoch.
 */
export class PipeChannel {
  readonly rank: number;
  readonly peer: number;
  readonly chunkBytes: number;
  readonly maxMessageBytes: number;
  readonly maxBufferedBytes: number;
  readonly #next: FrameLink | null;
  readonly #prev: FrameLink | null;
  #nextOp = 0;
  #rxNextOp = 0;
  #rx: Incoming | null = null;
  readonly #mailbox = new Map<string, Uint8Array>();
  #buffered = 0;
  readonly #waiting = new Map<string, { resolve: (b: Uint8Array) => void; reject: (e: Error) => void }>();
  #dead: Error | null = null;
  /** Sends go out one message after another (frames of two messages never interleave). */
  #sending: Promise<unknown> = Promise.resolve();
  readonly #unsubscribe: Array<() => void> = [];
  bytesSent = 0;

  constructor(opts: PipeOptions) {
    this.rank = opts.rank;
    this.peer = opts.peer;
    this.chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    this.maxMessageBytes = opts.maxMessageBytes ?? DEFAULT_MAX_PIPE_MESSAGE_BYTES;
    this.maxBufferedBytes = opts.maxBufferedBytes ?? DEFAULT_MAX_PIPE_BUFFERED_BYTES;
    this.#next = opts.next;
    this.#prev = opts.prev;
    const prev = opts.prev;
    if (opts.next && prev) {
      this.#unsubscribe.push(
        prev.onFrame((bytes) => this.#onFrame(bytes)),
        opts.next.onFrame(() => this.#violation(new ProtocolError(`unexpected frame from rank ${this.peer} on the outgoing pipe link: pipe links are one-way`))),
        prev.onClose((code, reason) => this.#fail(new LinkLostError("prev", this.peer, code, reason), CLOSE_ABORTED)),
        opts.next.onClose((code, reason) => this.#fail(new LinkLostError("next", this.peer, code, reason), CLOSE_ABORTED)),
      );
    }
  }

  get error(): Error | null {
    return this.#dead;
  }

  /** Send `data` under `tag`; resolves once its frames are handed to the link (backpressure). */
  send(tag: string, data: Uint8Array): Promise<PipeSendStats> {
    if (this.#dead) return Promise.reject(this.#dead);
    if (data.byteLength > this.maxMessageBytes) return Promise.reject(new RangeError(`pipe message of ${data.byteLength} bytes exceeds ${this.maxMessageBytes}`));
    const op = this.#nextOp++;
    const turn = this.#sending.then(() => this.#sendNow(op, tag, data));
    this.#sending = turn.catch(() => {});
    return turn;
  }

  async #sendNow(op: number, tag: string, data: Uint8Array): Promise<PipeSendStats> {
    if (this.#dead) throw this.#dead;
    const link = this.#next;
    if (!link) throw new Error(`pipe from rank ${this.rank} to rank ${this.peer} has no link`);
    let bytesSent = 0;
    let frames = 0;
    const head = encodeControl({ t: "op", kind: "pipe", op, tag, size: data.byteLength });
    await link.send(head);
    bytesSent += head.byteLength;
    frames++;
    for (let offset = 0; offset < data.byteLength; offset += this.chunkBytes) {
      if (this.#dead) throw this.#dead;
      const length = Math.min(this.chunkBytes, data.byteLength - offset);
      const frame = encodeBlobChunk({ phase: 0, op, owner: 0, total: data.byteLength, offset, length }, data.subarray(offset, offset + length));
      await link.send(frame);
      bytesSent += BLOB_HEADER_BYTES + length;
      frames++;
    }
    this.bytesSent += bytesSent;
    return { bytesSent, frames };
  }

  /** The message sent under `tag` (waiting for it, or taken from the mailbox). */
  recv(tag: string): Promise<Uint8Array> {
    if (this.#dead) return Promise.reject(this.#dead);
    const got = this.#mailbox.get(tag);
    if (got) {
      this.#mailbox.delete(tag);
      this.#buffered -= got.byteLength;
      return Promise.resolve(got);
    }
    if (this.#waiting.has(tag)) return Promise.reject(new Error(`pipe from rank ${this.peer}: tag ${tag} is already awaited`));
    return new Promise((resolve, reject) => this.#waiting.set(tag, { resolve, reject }));
  }

  /** Reject what waits and close both links: the pipe is unusable afterwards. */
  abort(reason: string): void {
    this.#fail(new Error(`pipe aborted: ${reason}`), CLOSE_ABORTED);
  }

  close(): void {
    this.#fail(new Error("pipe closed"), 1000);
  }

  #onFrame(bytes: Uint8Array): void {
    if (this.#dead) return;
    try {
      this.#handle(bytes);
    } catch (err) {
      this.#violation(err instanceof Error ? err : new Error(String(err)));
    }
  }

  #handle(bytes: Uint8Array): void {
    const frame = decodeFrame(bytes);
    const from = `rank ${this.peer}`;
    if (frame.kind === "control") {
      const m = frame.msg;
      if (m.t !== "op" || m.kind !== "pipe") throw new ProtocolError(`${from} sent a ${m.t === "op" ? `${m.kind ?? "allreduce"} op` : m.t} on a pipe link`);
      if (this.#rx) throw new ProtocolError(`${from} announced pipe message ${m.op} before finishing message ${this.#rx.op}`);
      if (m.op !== this.#rxNextOp) throw new ProtocolError(`${from} announced pipe message ${m.op}, expected ${this.#rxNextOp}`);
      if (m.size > this.maxMessageBytes) throw new ProtocolError(`${from} announced a pipe message of ${m.size} bytes, more than ${this.maxMessageBytes}`);
      if (this.#mailbox.has(m.tag)) throw new ProtocolError(`${from} sent tag ${m.tag} twice`);
      if (this.#buffered + m.size > this.maxBufferedBytes) {
        throw new ProtocolError(`${from} sent ${this.#buffered + m.size} bytes no one asked for yet (at most ${this.maxBufferedBytes})`);
      }
      this.#rxNextOp++;
      this.#rx = { op: m.op, tag: m.tag, size: m.size, parts: [], got: 0 };
      if (m.size === 0) this.#deliver();
      return;
    }
    if (frame.kind !== "blob") throw new ProtocolError(`${from} sent a tensor chunk on a pipe link`);
    const rx = this.#rx;
    if (!rx) throw new ProtocolError(`${from} sent a blob chunk without a pipe announcement`);
    if (frame.op !== rx.op || frame.phase !== 0 || frame.owner !== 0 || frame.total !== rx.size || frame.offset !== rx.got) {
      throw new ProtocolError(`${from} sent blob chunk op ${frame.op} bytes ${frame.offset}..${frame.offset + frame.length} of ${frame.total}; expected message ${rx.op} from byte ${rx.got} of ${rx.size}`);
    }
    rx.parts.push(frame.data.slice());
    rx.got += frame.length;
    if (rx.got === rx.size) this.#deliver();
  }

  #deliver(): void {
    const rx = this.#rx!;
    this.#rx = null;
    const data = rx.parts.length === 1 ? rx.parts[0] : concat(rx.parts, rx.size);
    const waiter = this.#waiting.get(rx.tag);
    if (waiter) {
      this.#waiting.delete(rx.tag);
      waiter.resolve(data);
      return;
    }
    this.#mailbox.set(rx.tag, data);
    this.#buffered += data.byteLength;
  }

  #violation(err: Error): void {
    this.#fail(err, CLOSE_PROTOCOL);
  }

  #fail(err: Error, code: number): void {
    if (this.#dead) return;
    this.#dead = err;
    for (const off of this.#unsubscribe) off();
    for (const w of this.#waiting.values()) w.reject(err);
    this.#waiting.clear();
    this.#mailbox.clear();
    this.#buffered = 0;
    this.#prev?.close(code, err.message);
    this.#next?.close(code, err.message);
  }
}

function concat(parts: Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}
