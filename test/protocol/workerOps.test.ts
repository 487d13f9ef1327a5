import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { ProtocolError } from "../../src/errors.js";
import { fromWorker, parseFromWorker, replies, sharedOrders, strategyOrders } from "../../src/protocol/workerOps.js";
import { PACKAGE_ROOT, PYTHON_RUNTIME_DIR } from "../../src/runtime/paths.js";
import type { WorkerMessage } from "../../src/runtime/workerLink.js";
import { testPython } from "../helpers/processes.js";

const msg = (header: Record<string, unknown> & { op: string }, payload = Buffer.alloc(0)): WorkerMessage => ({ header, payload });

function expectProtocolError(fn: () => unknown, pattern: RegExp) {
  expect(fn).toThrow(ProtocolError);
  expect(fn).toThrow(pattern);
}

describe("worker messages", () => {
  it("accepts an allreduce whose payload is count x 4 bytes", () => {
    const m = parseFromWorker(msg({ op: "allreduce", id: 2, dtype: "float32", count: 3 }, Buffer.alloc(12)), "rank 0");
    // A worker that names no codec means plain float32 on the wire.
    expect(m).toEqual({ op: "allreduce", id: 2, dtype: "float32", count: 3, codec: "f32", attempt: 0 });
    const coded = parseFromWorker(msg({ op: "allreduce", id: 3, dtype: "float32", count: 3, codec: "int8" }, Buffer.alloc(12)), "rank 0");
    expect(coded).toMatchObject({ codec: "int8" });
    const int4 = parseFromWorker(msg({ op: "allreduce", id: 3, dtype: "float32", count: 3, codec: "int4" }, Buffer.alloc(12)), "rank 0");
    expect(int4).toMatchObject({ codec: "int4" });
    expect(() => parseFromWorker(msg({ op: "allreduce", id: 4, dtype: "float32", count: 3, codec: "zip" }, Buffer.alloc(12)), "rank 2")).toThrow(/codec/);
    expect(parseFromWorker(msg({ op: "allreduce", id: 0, dtype: "float32", count: 0 }), "rank 0").op).toBe("allreduce");
  });

  it.each([11, 13, 3, 0, 24])("rejects an allreduce of 3 elements with a %i-byte payload, naming the worker", (bytes) => {
    expectProtocolError(
      () => parseFromWorker(msg({ op: "allreduce", id: 0, dtype: "float32", count: 3 }, Buffer.alloc(bytes)), "rank 4"),
      new RegExp(`rank 4 sent an allreduce of ${bytes} bytes for 3 float32`),
    );
  });

  it("rejects an allreduce in a dtype other than float32", () => {
    expectProtocolError(() => parseFromWorker(msg({ op: "allreduce", id: 0, dtype: "float64", count: 1 }, Buffer.alloc(8)), "rank 1"), /rank 1 .*dtype/);
  });

  it("accepts state whose file sizes sum to the payload", () => {
    const m = parseFromWorker(
      msg({ op: "state", kind: "checkpoint", step: 5, files: [{ name: "model.pt", size: 10 }, { name: "data.json", size: 0 }, { name: "rng.pt", size: 6 }] }, Buffer.alloc(16)),
      "rank 0",
    );
    expect(m).toMatchObject({ op: "state", kind: "checkpoint", step: 5 });
    expect(m.op === "state" && m.files.map((f) => f.size)).toEqual([10, 0, 6]);
  });

  it.each([
    ["fewer", 15],
    ["more", 17],
  ])("rejects state whose file sizes sum to %s bytes than the payload", (_name, payloadBytes) => {
    expectProtocolError(
      () => parseFromWorker(msg({ op: "state", kind: "final", step: 1, files: [{ name: "a", size: 10 }, { name: "b", size: 6 }] }, Buffer.alloc(payloadBytes)), "rank 2"),
      new RegExp(`rank 2 sent state files totalling 16 bytes in a ${payloadBytes}-byte payload`),
    );
  });

  it("rejects state with a negative file size (which could otherwise make the sums agree)", () => {
    expectProtocolError(
      () => parseFromWorker(msg({ op: "state", kind: "final", step: 1, files: [{ name: "a", size: 20 }, { name: "b", size: -4 }] }, Buffer.alloc(16)), "rank 0"),
      /files\.1\.size/,
    );
  });

  it.each([
    ["ready", { op: "ready", params: 100, param_bytes: 400, model: "Linear", train_size: 10, val_size: 2 }],
    ["synced", { op: "synced", hash: "ab12" }],
    ["step_done", { op: "step_done", step: 0, loss: 2.3, samples: 16, micro_batches: 1, max_micro_batch: null, lr: 0.1, compute_s: 0.5, comm_s: 0.1, skipped: false, dense_count: 100 }],
    ["step_done with hash", { op: "step_done", step: 9, loss: 0, samples: 0, micro_batches: 0, max_micro_batch: 4, lr: 0.1, compute_s: 0.5, comm_s: 0.1, hash: "ff", skipped: false, dense_count: 7 }],
    ["skipped step_done", { op: "step_done", step: 4, loss: 0, samples: 8, micro_batches: 2, max_micro_batch: 4, lr: 0.1, compute_s: 0.5, comm_s: 0.1, skipped: true, nonfinite: ["loss", "fc.weight"], dense_count: 7 }],
    ["allgather", { op: "allgather", id: 3, size: 0, attempt: 2 }],
    ["decided (commit)", { op: "decided", step: 4, verdict: "commit", next_step: 5, hash: "ab" }],
    ["decided (abort)", { op: "decided", step: 4, verdict: "abort", next_step: 4, hash: "ab" }],
    ["eval_done", { op: "eval_done", step: 3, count: 100, sums: { loss: 12.5, accuracy: 91 } }],
    ["loaded", { op: "loaded", step: 12 }],
    ["error", { op: "error", message: "boom", where: "task.py: build_model", kind: "task" }],
  ] as const)("accepts a valid %s", (_name, header) => {
    expect(parseFromWorker(msg({ ...header }), "rank 0")).toEqual(header);
  });

  it.each([
    ["an unknown op", { op: "launch" }, /rank 3 sent an invalid launch message/],
    ["ready without params", { op: "ready", param_bytes: 4, model: "m", train_size: 1, val_size: 1 }, /params/],
    ["step_done with a string loss", { op: "step_done", step: 0, loss: "nan", samples: 1, lr: 0.1, compute_s: 0, comm_s: 0 }, /loss/],
    ["step_done with a negative step", { op: "step_done", step: -1, loss: 1, samples: 1, lr: 0.1, compute_s: 0, comm_s: 0 }, /step/],
    ["eval_done with a non-numeric sum", { op: "eval_done", step: 0, count: 1, sums: { acc: "1" } }, /sums\.acc/],
    ["error without a message", { op: "error", where: "x" }, /message/],
    ["allgather with a negative size", { op: "allgather", id: 0, size: -1 }, /size/],
  ] as const)("rejects %s, naming the worker and the field", (_name, header, pattern) => {
    expectProtocolError(() => parseFromWorker(msg({ ...header } as WorkerMessage["header"]), "rank 3"), /rank 3/);
    expectProtocolError(() => parseFromWorker(msg({ ...header } as WorkerMessage["header"]), "rank 3"), pattern);
  });
});

describe("one schema per worker operation", () => {
  it("rejects a payload on a message that carries none", () => {
    expectProtocolError(() => parseFromWorker(msg({ op: "synced", hash: "ab" }, Buffer.alloc(3)), "rank 1"), /rank 1 sent a synced message with a 3-byte payload/);
  });

  it("is the list of orders the Python worker serves, for every strategy", async () => {
    const python = await testPython();
    const out = execFileSync(python, ["-c", "import json; from nimble_worker.__main__ import served_ops; print(json.dumps(served_ops()))"], {
      env: { ...process.env, PYTHONPATH: PYTHON_RUNTIME_DIR },
      encoding: "utf8",
    });
    const { shared, ...strategies } = JSON.parse(out) as Record<string, string[]>;
    // init comes first and the results answer a worker's own collectives: not in its table.
    const outsideTheTable = ["init", "allreduce_result", "allgather_result", "pipe_sent", "pipe_data"];
    expect(shared).toEqual(Object.keys(sharedOrders).filter((op) => !outsideTheTable.includes(op)).sort());
    expect(Object.keys(strategies).sort()).toEqual(Object.keys(strategyOrders).sort());
    for (const [name, orders] of Object.entries(strategyOrders)) expect(strategies[name]).toEqual(Object.keys(orders).sort());
  });

  it("is what docs/protocol.md lists, in both directions", () => {
    const doc = readFileSync(path.join(PACKAGE_ROOT, "docs", "protocol.md"), "utf8");
    const section = doc.slice(doc.indexOf("## Worker link"), doc.indexOf("\n## ", doc.indexOf("## Worker link") + 1));
    const opsOfTable = (heading: string) => {
      const table = section.slice(section.indexOf(heading)).split("\n\n")[1];
      return [...table.matchAll(/^\| `([a-z_]+)` \|/gm)].map((m) => m[1]).sort();
    };
    const orders = [...Object.keys(sharedOrders), ...Object.values(strategyOrders).flatMap((o) => Object.keys(o))];
    expect(opsOfTable("Provider -> worker:")).toEqual(orders.sort());
    expect(opsOfTable("Worker -> provider:")).toEqual(Object.keys(fromWorker).sort());
    for (const answers of Object.values(replies)) for (const op of answers) expect(Object.keys(fromWorker)).toContain(op);
  });
});
