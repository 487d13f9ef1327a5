/**
 * The Python side simulates the wire codecs (python-runtime/nimble_worker/compress/fake.py,
 * `encode`: the in-process test group and single-worker runs use it); it must give the
 * very bits of decode(encode(x)) here, for every codec.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { roundTrip } from "../../src/collective/codecs.js";
import { WIRE_CODECS } from "../../src/protocol/frames.js";
import { PYTHON_RUNTIME_DIR } from "../../src/runtime/paths.js";
import { testPython } from "../helpers/processes.js";
import { randomBuffer } from "./ringHarness.js";

/** Cases padded to 256 values each (a whole int8 block, four int4 blocks), so each stands alone. */
function cases(): Float32Array {
  const parts: number[][] = [];
  const u = new Uint32Array(1);
  const f = new Float32Array(u.buffer);
  // exact ties for int8 (absmax 127: scale 1) and int4 (absmax 7: scale 1), -0, tiny negatives
  parts.push([127, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, -0, -1e-30, 1e-30, 3.5, -3.5]);
  parts.push([7, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -6.5, 6.5, -0, -1e-30, 1e-30]);
  parts.push([]); // all zero
  parts.push([1, NaN, 2]);
  parts.push([1, Infinity, 2]);
  parts.push([-Infinity, 3]);
  parts.push([2 ** -149, -(2 ** -148), 3 * 2 ** -149, 2 ** -140]); // scale underflows
  parts.push([3.4e38, -3.4e38, 1e38, -1]); // huge
  // near-ties: values a few ulps either side of (k + 0.5) x scale
  const near: number[] = [7];
  for (let k = 0; k < 7; k++) for (let d = -3; d <= 3; d++) {
    f[0] = k + 0.5;
    u[0] += d;
    near.push(f[0], -f[0]);
  }
  parts.push(near);
  // random bit patterns of finite floats over a range of exponents, one magnitude per block
  let s = 987654321;
  for (let b = 0; b < 24; b++) {
    const block: number[] = [];
    const exp = 40 + ((b * 37) % 170);
    for (let i = 0; i < 256; i++) {
      s = (Math.imul(s, 1103515245) + 12345) >>> 0;
      u[0] = ((s & 0x807fffff) | ((exp + ((s >>> 23) % 6)) << 23)) >>> 0;
      block.push(f[0]);
    }
    parts.push(block);
  }
  const out = new Float32Array(parts.length * 256 + 10_001);
  parts.forEach((p, k) => out.set(p, k * 256));
  // then uniform values of a few magnitudes, and an odd tail (half a byte of int4 padding)
  const r = randomBuffer(10_001, 11);
  for (let i = 0; i < r.length; i++) r[i] *= [1, 1e-3, 40, 1e-6][Math.floor(i / 640) % 4];
  out.set(r, parts.length * 256);
  return out;
}

const dir = mkdtempSync(path.join(os.tmpdir(), "nimble-codec-parity-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const PY = `
import sys, torch
from nimble_worker.compress.fake import encode
src, dst, codec = sys.argv[1:]
x = torch.frombuffer(bytearray(open(src, "rb").read()), dtype=torch.float32)
open(dst, "wb").write(encode(x, codec).numpy().tobytes())
`;

describe("Python fake.encode and the TypeScript codecs", () => {
  const src = cases();
  writeFileSync(path.join(dir, "src.f32"), new Uint8Array(src.buffer));
  for (const codec of WIRE_CODECS) {
    it(`agree bit for bit on ${codec}`, async () => {
      const python = await testPython();
      const out = path.join(dir, `${codec}.f32`);
      execFileSync(python, ["-c", PY, path.join(dir, "src.f32"), out, codec], { env: { ...process.env, PYTHONPATH: PYTHON_RUNTIME_DIR } });
      const bytes = readFileSync(out);
      const py = new Float32Array(new Uint8Array(bytes).buffer);
      const ts = roundTrip(codec, src);
      expect(py.length).toBe(ts.length);
      const pyBits = new Uint32Array(py.buffer);
      const tsBits = new Uint32Array(ts.buffer);
      const diffs: string[] = [];
      for (let i = 0; i < ts.length && diffs.length < 10; i++) {
        // NaN payloads may differ (torch's f16 / bf16 casts pick their own quiet NaN)
        if (Number.isNaN(ts[i]) && Number.isNaN(py[i])) continue;
        if (pyBits[i] !== tsBits[i]) diffs.push(`[${i}] x=${src[i]} ts=${ts[i]} py=${py[i]}`);
      }
      expect(diffs).toEqual([]);
    });
  }
});
