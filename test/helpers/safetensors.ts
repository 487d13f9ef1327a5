import { readFile } from "node:fs/promises";
import path from "node:path";

/** Read float32 tensors from a .safetensors file (8-byte LE header length, JSON header, data). */
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
    if (t.dtype !== "F32") throw new Error(`${name}: dtype ${t.dtype}`);
    const bytes = buf.subarray(base + t.data_offsets[0], base + t.data_offsets[1]);
    out.set(name, { shape: t.shape, data: new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)) });
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
