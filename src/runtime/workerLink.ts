import { ProtocolError } from "../errors.js";

/** Worker-link frames: u32 LE header length | u32 LE payload length | JSON header | raw payload. */
export interface WorkerMessage {
  header: Record<string, unknown> & { op: string };
  payload: Buffer;
}

const MAX_HEADER_BYTES = 1 << 20;
/** The most one frame may carry, and the most a shared-buffer all-reduce may cover. */
export const MAX_PAYLOAD_BYTES = 2 ** 31;

export function encodeWorkerFrame(header: Record<string, unknown>, payload?: Uint8Array): Buffer[] {
  const headerBytes = Buffer.from(JSON.stringify(header), "utf8");
  const prefix = Buffer.alloc(8);
  prefix.writeUInt32LE(headerBytes.length, 0);
  prefix.writeUInt32LE(payload?.byteLength ?? 0, 4);
  const parts: Buffer[] = [prefix, headerBytes];
  if (payload && payload.byteLength > 0) parts.push(Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength));
  return parts;
}

/**
 * Incremental decoder for a byte stream of worker-link frames. A frame's payload is copied
 * once, as its chunks arrive, into a buffer of its announced size: a large payload (a
 * state of hundreds of MB) is never held twice, as chunks and joined.
 */
export class WorkerFrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** The frame whose header is in and whose payload is arriving. */
  private pending: { header: WorkerMessage["header"]; payload: Buffer; filled: number } | null = null;

  push(chunk: Buffer): WorkerMessage[] {
    const out: WorkerMessage[] = [];
    let rest: Buffer | null = chunk;
    while (rest !== null) {
      if (this.pending) {
        const p = this.pending;
        const n = Math.min(rest.length, p.payload.length - p.filled);
        rest.copy(p.payload, p.filled, 0, n);
        p.filled += n;
        rest = n < rest.length ? rest.subarray(n) : null;
        if (p.filled === p.payload.length) {
          out.push({ header: p.header, payload: p.payload });
          this.pending = null;
        }
        continue;
      }
      this.chunks.push(rest);
      this.buffered += rest.length;
      rest = null;
      if (this.buffered < 8) break;
      const head = this.peek(8);
      const headerLen = head.readUInt32LE(0);
      const payloadLen = head.readUInt32LE(4);
      if (headerLen === 0 || headerLen > MAX_HEADER_BYTES) throw new ProtocolError(`worker frame header of ${headerLen} bytes`);
      if (payloadLen > MAX_PAYLOAD_BYTES) throw new ProtocolError(`worker frame payload of ${payloadLen} bytes`);
      if (this.buffered < 8 + headerLen) break;
      const all = this.take();
      const header = parseHeader(all.subarray(8, 8 + headerLen));
      const body = all.subarray(8 + headerLen);
      if (body.length >= payloadLen) {
        // Small frames (and what follows them) stay slices of the chunk they came in.
        out.push({ header, payload: body.subarray(0, payloadLen) });
        rest = body.length > payloadLen ? body.subarray(payloadLen) : null;
      } else {
        const payload = Buffer.allocUnsafe(payloadLen);
        body.copy(payload, 0);
        this.pending = { header, payload, filled: body.length };
      }
    }
    return out;
  }

  private peek(n: number): Buffer {
    if (this.chunks[0].length >= n) return this.chunks[0];
    this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0];
  }

  /** Everything buffered, as one buffer (a frame's prefix and header are small). */
  private take(): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return all;
  }
}

function parseHeader(bytes: Buffer): WorkerMessage["header"] {
  let header: unknown;
  try {
    header = JSON.parse(bytes.toString("utf8"));
  } catch {
    throw new ProtocolError("worker frame header is not JSON");
  }
  if (typeof header !== "object" || header === null || typeof (header as { op?: unknown }).op !== "string") {
    throw new ProtocolError("worker frame header has no op");
  }
  return header as WorkerMessage["header"];
}
