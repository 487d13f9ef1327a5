import { describe, expect, it } from "vitest";
import { ProtocolError } from "../../src/errors.js";
import { encodeWorkerFrame, WorkerFrameDecoder } from "../../src/runtime/workerLink.js";

const frame = (header: Record<string, unknown>, payload?: Uint8Array) => Buffer.concat(encodeWorkerFrame(header, payload));

function rawFrame(headerBytes: Buffer, payload = Buffer.alloc(0), headerLen = headerBytes.length): Buffer {
  const prefix = Buffer.alloc(8);
  prefix.writeUInt32LE(headerLen, 0);
  prefix.writeUInt32LE(payload.length, 4);
  return Buffer.concat([prefix, headerBytes, payload]);
}

function floats(n: number, seed = 1): Uint8Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (i + 1) * seed * 0.5;
  return new Uint8Array(a.buffer);
}

describe("worker link framing", () => {
  it("lays a frame out as u32 LE header length | u32 LE payload length | JSON | payload", () => {
    const payload = new Uint8Array([9, 8, 7]);
    const bytes = frame({ op: "allreduce", id: 0, dtype: "float32", count: 0 }, payload);
    const json = JSON.stringify({ op: "allreduce", id: 0, dtype: "float32", count: 0 });
    expect(bytes.readUInt32LE(0)).toBe(Buffer.byteLength(json));
    expect(bytes.readUInt32LE(4)).toBe(3);
    expect(bytes.subarray(8, 8 + Buffer.byteLength(json)).toString("utf8")).toBe(json);
    expect([...bytes.subarray(8 + Buffer.byteLength(json))]).toEqual([9, 8, 7]);
  });

  it("round-trips header and payload", () => {
    const payload = floats(1000);
    const header = { op: "step_done", step: 3, loss: 0.25, samples: 21, lr: 0.001, compute_s: 0.1, comm_s: 0.02, note: "ünïcødé ✓" };
    const [m] = new WorkerFrameDecoder().push(frame(header, payload));
    expect(m.header).toEqual(header);
    expect(Buffer.from(m.payload).equals(Buffer.from(payload))).toBe(true);
  });

  it("round-trips a frame without payload as an empty payload", () => {
    const out = new WorkerFrameDecoder().push(frame({ op: "sync" }));
    expect(out).toHaveLength(1);
    expect(out[0].header).toEqual({ op: "sync" });
    expect(out[0].payload.length).toBe(0);
  });

  it("encodes a payload that is a view into a larger buffer without the bytes around it", () => {
    const backing = new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]);
    const view = backing.subarray(2, 5);
    const [m] = new WorkerFrameDecoder().push(frame({ op: "x" }, view));
    expect([...m.payload]).toEqual([3, 4, 5]);
  });

  it("reassembles a frame split across many pushes, byte by byte", () => {
    const payload = floats(37, 3);
    const bytes = frame({ op: "allreduce", id: 5, dtype: "float32", count: 37 }, payload);
    const decoder = new WorkerFrameDecoder();
    const out = [];
    for (let i = 0; i < bytes.length; i++) {
      const got = decoder.push(bytes.subarray(i, i + 1));
      if (i < bytes.length - 1) expect(got).toEqual([]);
      out.push(...got);
    }
    expect(out).toHaveLength(1);
    expect(out[0].header).toEqual({ op: "allreduce", id: 5, dtype: "float32", count: 37 });
    expect(Buffer.from(out[0].payload).equals(Buffer.from(payload))).toBe(true);
  });

  it("decodes several frames in one push, in order, and keeps a trailing partial frame for later", () => {
    const a = frame({ op: "ready", params: 10 });
    const b = frame({ op: "allreduce", id: 0, dtype: "float32", count: 4 }, floats(4, 2));
    const c = frame({ op: "synced", hash: "abc" });
    const d = frame({ op: "loaded", step: 7 }, new Uint8Array([1, 2]));
    const decoder = new WorkerFrameDecoder();
    const all = Buffer.concat([a, b, c, d]);
    const cut = all.length - 5;
    const first = decoder.push(all.subarray(0, cut));
    expect(first.map((m) => m.header.op)).toEqual(["ready", "allreduce", "synced"]);
    expect(Buffer.from(first[1].payload).equals(Buffer.from(floats(4, 2)))).toBe(true);
    expect(first[0].payload.length).toBe(0);
    expect(first[2].payload.length).toBe(0);
    const rest = decoder.push(all.subarray(cut));
    expect(rest).toHaveLength(1);
    expect(rest[0].header).toEqual({ op: "loaded", step: 7 });
    expect([...rest[0].payload]).toEqual([1, 2]);
  });

  it("handles random chunkings of a long stream identically", () => {
    const frames = Array.from({ length: 40 }, (_, i) => ({ header: { op: "m", i }, payload: i % 3 === 0 ? new Uint8Array(0) : floats(i, i) }));
    const stream = Buffer.concat(frames.map((f) => frame(f.header, f.payload)));
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    for (let trial = 0; trial < 20; trial++) {
      const decoder = new WorkerFrameDecoder();
      const out = [];
      for (let pos = 0; pos < stream.length; ) {
        const n = 1 + Math.floor(rand() * 200);
        out.push(...decoder.push(stream.subarray(pos, pos + n)));
        pos += n;
      }
      expect(out.map((m) => m.header)).toEqual(frames.map((f) => f.header));
      out.forEach((m, i) => expect(Buffer.from(m.payload).equals(Buffer.from(frames[i].payload))).toBe(true));
    }
  });

  it("rejects a header length of 0", () => {
    expect(() => new WorkerFrameDecoder().push(rawFrame(Buffer.alloc(0)))).toThrow(ProtocolError);
    expect(() => new WorkerFrameDecoder().push(rawFrame(Buffer.alloc(0)))).toThrow(/header of 0 bytes/);
  });

  it("rejects a header longer than 1 MiB as soon as the length prefix arrives", () => {
    const prefix = Buffer.alloc(8);
    prefix.writeUInt32LE((1 << 20) + 1, 0);
    prefix.writeUInt32LE(0, 4);
    // Only the 8-byte prefix: it must not wait for (or buffer) a megabyte first.
    expect(() => new WorkerFrameDecoder().push(prefix)).toThrow(ProtocolError);
    expect(() => new WorkerFrameDecoder().push(prefix)).toThrow(/header of 1048577 bytes/);
  });

  it("accepts a header of exactly 1 MiB", () => {
    const json = JSON.stringify({ op: "log", pad: "" });
    const pad = "x".repeat((1 << 20) - Buffer.byteLength(json));
    const header = Buffer.from(JSON.stringify({ op: "log", pad }));
    expect(header.length).toBe(1 << 20);
    const [m] = new WorkerFrameDecoder().push(rawFrame(header));
    expect(m.header.op).toBe("log");
  });

  it("rejects a header that is not JSON", () => {
    expect(() => new WorkerFrameDecoder().push(rawFrame(Buffer.from("{op: ready")))).toThrow(ProtocolError);
    expect(() => new WorkerFrameDecoder().push(rawFrame(Buffer.from("{op: ready")))).toThrow(/not JSON/);
  });

  it.each([
    ["an object without op", { step: 1 }],
    ["op that is not a string", { op: 3 }],
    ["a JSON array", [{ op: "ready" }]],
    ["a JSON string", "ready"],
    ["null", null],
  ])("rejects a header that is %s", (_name, header) => {
    const bytes = rawFrame(Buffer.from(JSON.stringify(header)));
    expect(() => new WorkerFrameDecoder().push(bytes)).toThrow(ProtocolError);
    expect(() => new WorkerFrameDecoder().push(bytes)).toThrow(/no op/);
  });
});
