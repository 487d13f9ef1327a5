import { readFile } from "node:fs/promises";
import path from "node:path";

/** Read the tensors of a .safetensors file (8-byte LE header length, JSON header, data) as float32 (I64 counters converted). */
export async function readSafetensors(file: string): Promise<Map<string, { shape: number[]; data: Float32Array }>> {
  const buf = await readFile(file);
  const headerLen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + headerLen).toString("utf8")) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >;
  const base = 8 + headerLen;
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const bytes = buf.subarray(base + t.data_offsets[0], base + t.data_offsets[1]);
    const raw = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    if (t.dtype === "F32") out.set(name, { shape: t.shape, data: new Float32Array(raw) });
    else if (t.dtype === "I64") out.set(name, { shape: t.shape, data: Float32Array.from(new BigInt64Array(raw), Number) });
    else throw new Error(`${name}: dtype ${t.dtype}`);
  }
  return out;
}

/**
 * Largest absolute difference between the weights of two runs' model.safetensors, and how
 * many values were compared. Throws if their tensors' names or shapes differ.
 */
export async function maxWeightDifference(runDirA: string, runDirB: string): Promise<{ maxDiff: number; values: number }> {
  const a = await readSafetensors(path.join(runDirA, "model.safetensors"));
  const b = await readSafetensors(path.join(runDirB, "model.safetensors"));
  if ([...a.keys()].join() !== [...b.keys()].join()) throw new Error(`tensors differ: ${[...a.keys()]} vs ${[...b.keys()]}`);
  let maxDiff = 0;
  let values = 0;
  for (const [name, t] of a) {
    const u = b.get(name)!;
    if (t.shape.join() !== u.shape.join()) throw new Error(`${name}: shape ${t.shape} vs ${u.shape}`);
    for (let i = 0; i < t.data.length; i++) maxDiff = Math.max(maxDiff, Math.abs(t.data[i] - u.data[i]));
    values += t.data.length;
  }
  return { maxDiff, values };
}
