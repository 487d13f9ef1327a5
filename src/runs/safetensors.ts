/**
 * Just enough of the safetensors format (an 8-byte little-endian header length, a JSON
 * header of `name -> {dtype, shape, data_offsets}` plus `__metadata__`, then the data) to
 * merge the files of a pipeline's stages into one model.safetensors under the unsplit
 * model's names. Everything read is checked: the files come from providers.
 */
import { ProtocolError } from "../errors.js";

interface TensorEntry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

export interface SafetensorsFile {
  metadata: Record<string, string>;
  tensors: Map<string, { dtype: string; shape: number[]; data: Uint8Array }>;
}

const MAX_HEADER_BYTES = 100 * 1024 * 1024;

export function parseSafetensors(bytes: Uint8Array, what: string): SafetensorsFile {
  if (bytes.byteLength < 8) throw new ProtocolError(`${what}: ${bytes.byteLength} bytes is too short for safetensors`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  if (headerLen > MAX_HEADER_BYTES || 8 + headerLen > bytes.byteLength) throw new ProtocolError(`${what}: safetensors header of ${headerLen} bytes does not fit the file`);
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + headerLen)));
  } catch (err) {
    throw new ProtocolError(`${what}: safetensors header is not JSON: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) throw new ProtocolError(`${what}: safetensors header is not an object`);
  const data = bytes.subarray(8 + headerLen);
  const out: SafetensorsFile = { metadata: {}, tensors: new Map() };
  for (const [name, value] of Object.entries(header as Record<string, unknown>)) {
    if (name === "__metadata__") {
      for (const [k, v] of Object.entries((value ?? {}) as Record<string, unknown>)) if (typeof v === "string") out.metadata[k] = v;
      continue;
    }
    const e = value as TensorEntry;
    const [start, end] = Array.isArray(e?.data_offsets) ? e.data_offsets : [NaN, NaN];
    if (typeof e?.dtype !== "string" || !Array.isArray(e.shape) || !e.shape.every((d) => Number.isInteger(d) && d >= 0) || !Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end < start || end > data.byteLength) {
      throw new ProtocolError(`${what}: tensor ${name.slice(0, 128)} has a malformed entry`);
    }
    out.tensors.set(name, { dtype: e.dtype, shape: e.shape, data: data.subarray(start, end) });
  }
  return out;
}

export function encodeSafetensors(file: SafetensorsFile): Uint8Array {
  const header: Record<string, unknown> = { __metadata__: file.metadata };
  let offset = 0;
  for (const [name, t] of file.tensors) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  // Pad the header so the data starts 8-byte aligned, as the reference writer does.
  while ((8 + Buffer.byteLength(json)) % 8 !== 0) json += " ";
  const head = Buffer.from(json, "utf8");
  const out = new Uint8Array(8 + head.byteLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.byteLength), true);
  out.set(head, 8);
  let at = 8 + head.byteLength;
  for (const t of file.tensors.values()) {
    out.set(t.data, at);
    at += t.data.byteLength;
  }
  return out;
}

/**
 * The stages' files as one: every tensor once (a name in two stages is an error), metadata
 * from the first stage, with `stages` added; `tied` and `dropped` lists are combined.
 */
export function mergeSafetensors(files: { what: string; bytes: Uint8Array }[]): Uint8Array {
  const merged: SafetensorsFile = { metadata: {}, tensors: new Map() };
  const tied: Record<string, string> = {};
  const dropped: string[] = [];
  files.forEach(({ what, bytes }, k) => {
    const f = parseSafetensors(bytes, what);
    if (k === 0) merged.metadata = { ...f.metadata };
    if (f.metadata.tied) Object.assign(tied, JSON.parse(f.metadata.tied));
    if (f.metadata.dropped) dropped.push(f.metadata.dropped);
    for (const [name, t] of f.tensors) {
      if (merged.tensors.has(name)) throw new ProtocolError(`${what}: tensor ${name} is also in an earlier stage`);
      merged.tensors.set(name, t);
    }
  });
  delete merged.metadata.tied;
  delete merged.metadata.dropped;
  if (Object.keys(tied).length) merged.metadata.tied = JSON.stringify(tied);
  if (dropped.length) merged.metadata.dropped = dropped.join(", ");
  merged.metadata.stages = String(files.length);
  return encodeSafetensors(merged);
}
