import { ProtocolError } from "../errors.js";

/** Worker-link frames: u32 LE header length | u32 LE payload length | JSON header | raw payload. */
export interface WorkerMessage {
  header: Record<string, unknown> & { op: string };
  payload: Buffer;
}

const MAX_HEADER_BYTES = 1 << 20;
const MAX_PAYLOAD_BYTES = 2 ** 31;

export function encodeWorkerFrame(header: Record<string, unknown>, payload?: Uint8Array): Buffer[] {
  const headerBytes = Buffer.from(JSON.stringify(header), "utf8");
  const prefix = Buffer.alloc(8);
  prefix.writeUInt32LE(headerBytes.length, 0);
  prefix.writeUInt32LE(payload?.byteLength ?? 0, 4);
  const parts: Buffer[] = [prefix, headerBytes];
  if (payload && payload.byteLength > 0) parts.push(Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength));
  return parts;
}

/** Incremental decoder for a byte stream of worker-link frames. */
export class WorkerFrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;

  push(chunk: Buffer): WorkerMessage[] {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const out: WorkerMessage[] = [];
    for (;;) {
      if (this.buffered < 8) break;
      const head = this.peek(8);
      const headerLen = head.readUInt32LE(0);
      const payloadLen = head.readUInt32LE(4);
      if (headerLen === 0 || headerLen > MAX_HEADER_BYTES) throw new ProtocolError(`worker frame header of ${headerLen} bytes`);
      if (payloadLen > MAX_PAYLOAD_BYTES) throw new ProtocolError(`worker frame payload of ${payloadLen} bytes`);
      if (this.buffered < 8 + headerLen + payloadLen) break;
      const frame = this.take(8 + headerLen + payloadLen);
      let header: unknown;
      try {
        header = JSON.parse(frame.subarray(8, 8 + headerLen).toString("utf8"));
      } catch {
        throw new ProtocolError("worker frame header is not JSON");
      }
      if (typeof header !== "object" || header === null || typeof (header as { op?: unknown }).op !== "string") {
        throw new ProtocolError("worker frame header has no op");
      }
      out.push({ header: header as WorkerMessage["header"], payload: frame.subarray(8 + headerLen) });
    }
    return out;
  }

  private peek(n: number): Buffer {
    if (this.chunks[0].length >= n) return this.chunks[0];
    this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0];
  }

  private take(n: number): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const frame = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    return frame;
  }
}
