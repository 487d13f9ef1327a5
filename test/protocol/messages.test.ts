import { decode, encode } from "@msgpack/msgpack";
import { describe, expect, it } from "vitest";
import { ProtocolError } from "../../src/errors.js";
import {
  decodeToCoordinator,
  decodeToProvider,
  encodeMessage,
  jobSpecProblem,
  PROTOCOL_VERSION,
  type ToCoordinator,
  type ToProvider,
} from "../../src/protocol/messages.js";
import { parseOrder } from "../../src/protocol/workerOps.js";
import { unpack } from "../../src/job/coordinator/answers.js";

const code = new TextEncoder().encode("import torch\n\ndef build_model(args):\n    return torch.nn.Linear(2, 2)\n");

/** Shaped like a proof (identity/proof.ts); what it proves is tested in test/net. */
const proof = { key: `ed25519:${"A".repeat(43)}`, nonce: new Uint8Array(32).fill(1), sig: new Uint8Array(64).fill(2), mac: new Uint8Array(32).fill(3) };

const toProvider: ToProvider[] = [
  { t: "hello", version: PROTOCOL_VERSION, ...proof },
  {
    t: "job",
    job: "3f1c-job",
    credential: { ranks: [0, 1], sig: new Uint8Array(64).fill(9) },
    task: { filename: "task.py", code },
    config: { name: "mnist", steps: 10, optimizer: { name: "adam", lr: 0.001 }, task_args: {} },
    world_size: 3,
    ranks: [
      { rank: 0, device: "cpu" },
      { rank: 1, device: "cuda:0" },
    ],
    ring: [
      { rank: 0, url: "wss://127.0.0.1:7070/ring", key: proof.key },
      { rank: 1, url: "wss://127.0.0.1:7070/ring", key: proof.key },
      { rank: 2, url: "wss://10.0.0.2:7070/ring", key: proof.key },
    ],
    threads: 4,
  },
  { t: "order", ranks: [0, 1], order: { op: "sync", source: 0 } },
  { t: "ring", epoch: 1, members: [0, 2] },
  { t: "probe_links", bytes: 1024 * 1024 },
  { t: "order", ranks: [0, 1], order: { op: "step", step: 7, shares: [11, 11, 10], want_hash: true, decision: { step: 6, verdict: "commit" } } },
  { t: "order", ranks: [1], order: { op: "eval", step: 9, start: 500, count: 500, batch_size: 256 } },
  { t: "order", ranks: [2], order: { op: "load_state", files: [{ name: "model.pt", size: 3 }] }, payload: new Uint8Array([1, 2, 3]) },
  { t: "cancel", reason: "user pressed Ctrl-C" },
];

const stepDone = { op: "step_done", step: 3, loss: 0.6931, samples: 21, micro_batches: 1, max_micro_batch: null, lr: 0.001, compute_s: 0.12, comm_s: 0.03, skipped: false, hash: "cd".repeat(32), dense_count: 100 };

const stateFiles = [
  { name: "model.pt", data: new Uint8Array([0, 1, 2, 3, 255, 254]) },
  { name: "data.json", data: new TextEncoder().encode('{"step": 5}') },
  { name: "empty.bin", data: new Uint8Array(0) },
];

const toCoordinator: ToCoordinator[] = [
  {
    t: "welcome",
    ...proof,
    version: PROTOCOL_VERSION,
    provider: {
      id: "host:7070",
      hostname: "host",
      python: "3.11.9",
      torch: "2.13.0",
      devices: [
        { id: "cuda:0", kind: "cuda", name: "NVIDIA H100", memory_bytes: 80 * 2 ** 30 },
        { id: "cpu", kind: "cpu", name: "x86_64", cores: 16 },
      ],
    },
  },
  { t: "reject", reason: "wrong token" },
  { t: "ready", rank: 1, info: { params: 1234, param_bytes: 4936, model: "Linear(4, 2)", train_size: 60000, val_size: 10000 } },
  { t: "report", rank: 0, bytes_sent: 4096, report: { op: "synced", hash: "ab".repeat(32) } },
  { t: "report", rank: 2, bytes_sent: 2048, report: stepDone },
  { t: "ring_ready", rank: 2, epoch: 1 },
  { t: "link", rank: 0, to: 1, rtt_ms: 51.5, upload_bytes_per_s: 2.5e6 },
  { t: "link", rank: 1, to: 2, rtt_ms: null, upload_bytes_per_s: null },
  { t: "report", rank: 0, bytes_sent: 0, report: { op: "eval_done", step: 9, count: 500, sums: { loss: 123.5, accuracy: 480 } } },
  { t: "log", line: "[rank 0] epoch 1" },
  { t: "failed", rank: 1, message: "boom", where: "task.py: build_model", kind: "task" },
  { t: "failed", message: "no job is running", kind: "internal" },
];

function expectProtocolError(fn: () => unknown, ...patterns: RegExp[]) {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(ProtocolError);
  for (const p of patterns) expect((caught as Error).message).toMatch(p);
}

describe("control messages: round trip", () => {
  it.each(toProvider.map((m) => [`${m.t}${m.t === "order" ? ` ${String(m.order.op)}` : ""}`, m] as const))("coordinator -> provider %s", (_name, message) => {
    const bytes = encodeMessage(message);
    expect(bytes).toBeInstanceOf(Uint8Array);
    expect(decodeToProvider(bytes)).toEqual(message);
  });

  it.each(toCoordinator.map((m, i) => [`${i} ${m.t}`, m] as const))("provider -> coordinator %s", (_name, message) => {
    expect(decodeToCoordinator(encodeMessage(message), "provider p1")).toEqual(message);
  });

  it("carries the task code as bytes, byte for byte", () => {
    const binary = new Uint8Array(256).map((_, i) => i);
    const job = { ...toProvider[1], task: { filename: "task.py", code: binary } } as ToProvider;
    const back = decodeToProvider(encodeMessage(job));
    if (back.t !== "job") throw new Error("expected a job");
    expect(back.task.code).toBeInstanceOf(Uint8Array);
    expect([...back.task.code]).toEqual([...binary]);
  });

  it("carries state files as bytes, byte for byte, in order", () => {
    const big = new Uint8Array(1 << 20);
    for (let i = 0; i < big.length; i++) big[i] = (i * 31) & 0xff;
    const files = [{ name: "model.safetensors", data: big }, ...stateFiles];
    const m: ToCoordinator = {
      t: "report",
      rank: 0,
      bytes_sent: 0,
      report: { op: "state", kind: "final", step: 100, files: files.map((f) => ({ name: f.name, size: f.data.byteLength })) },
      payload: Buffer.concat(files.map((f) => f.data)),
    };
    const back = unpack(decodeToCoordinator(encodeMessage(m), "provider p1"), "provider p1");
    if (back.t !== "state") throw new Error("expected state");
    expect(back.files.map((f) => f.name)).toEqual(["model.safetensors", "model.pt", "data.json", "empty.bin"]);
    for (const f of back.files) expect(f.data).toBeInstanceOf(Uint8Array);
    expect(Buffer.from(back.files[0].data).equals(Buffer.from(big))).toBe(true);
    expect([...back.files[1].data]).toEqual([0, 1, 2, 3, 255, 254]);
    expect(back.files[3].data.byteLength).toBe(0);
  });

  it("omits undefined optional fields instead of sending null", () => {
    const failed: ToCoordinator = { t: "failed", rank: undefined, message: "x", where: undefined, kind: "worker" };
    const raw = decode(encodeMessage(failed)) as Record<string, unknown>;
    expect(Object.keys(raw).sort()).toEqual(["kind", "message", "t"]);
    expect(decodeToCoordinator(encodeMessage(failed), "provider p1")).toEqual({ t: "failed", message: "x", kind: "worker" });

    const report: ToCoordinator = { t: "report", rank: 0, bytes_sent: 0, report: { op: "synced", hash: "h" }, payload: undefined };
    expect("payload" in (decode(encodeMessage(report)) as object)).toBe(false);
    expect(decodeToCoordinator(encodeMessage(report), "p")).not.toHaveProperty("payload");
  });

  it("rejects null where an optional field is expected (a sender that writes null is wrong)", () => {
    const bytes = encode({ t: "failed", message: "x", kind: "task", where: null });
    expectProtocolError(() => decodeToCoordinator(bytes, "provider p1"), /where/);
  });
});

describe("control messages: rejection", () => {
  it("rejects a text frame, naming the sender", () => {
    expectProtocolError(() => decodeToProvider(JSON.stringify({ t: "sync" }), "coordinator 10.0.0.1:5000"), /coordinator 10\.0\.0\.1:5000/, /text frame/);
    expectProtocolError(() => decodeToCoordinator('{"t":"reject","reason":"x"}', "provider ws://h:1"), /provider ws:\/\/h:1/);
  });

  it("defaults the provider-side sender name to `coordinator`", () => {
    expectProtocolError(() => decodeToProvider("hi"), /^coordinator /);
  });

  it("rejects bytes that are not msgpack, naming the sender", () => {
    // 0xc1 is the one byte msgpack never uses.
    expectProtocolError(() => decodeToProvider(new Uint8Array([0xc1, 0x00, 0x01]), "coordinator A"), /coordinator A/, /not msgpack/);
    // A truncated map.
    const truncated = encodeMessage({ t: "cancel", reason: "abcdef" }).subarray(0, 5);
    expectProtocolError(() => decodeToProvider(truncated, "coordinator A"), /coordinator A/, /not msgpack/);
  });

  it("rejects msgpack that is not a map", () => {
    expectProtocolError(() => decodeToProvider(encode([1, 2, 3]), "coordinator A"), /coordinator A/, /invalid message/);
    expectProtocolError(() => decodeToCoordinator(encode("welcome"), "provider B"), /provider B/, /invalid message/);
  });

  it("rejects an unknown `t`, naming the sender and the field", () => {
    expectProtocolError(() => decodeToProvider(encode({ t: "shutdown" }), "coordinator A"), /coordinator A/, /\bt\b/);
    expectProtocolError(() => decodeToCoordinator(encode({ t: "hello", token: "x", version: 1 }), "provider B"), /provider B/, /\bt\b/);
    expectProtocolError(() => decodeToProvider(encode({ step: 1 }), "coordinator A"), /\bt\b/);
  });

  it("a provider does not accept coordinator-bound messages and vice versa", () => {
    expectProtocolError(() => decodeToProvider(encodeMessage({ t: "reject", reason: "x" }), "coordinator A"));
    expectProtocolError(() => decodeToCoordinator(encodeMessage({ t: "order", ranks: [0], order: { op: "sync" } }), "provider B"));
    expectProtocolError(() => decodeToProvider(encodeMessage({ t: "report", rank: 0, bytes_sent: 0, report: { op: "synced", hash: "h" } }), "coordinator A"));
  });

  it.each([
    ["order.ranks empty", { t: "order", ranks: [], order: { op: "sync" } }, /ranks/],
    ["order.order not a map", { t: "order", ranks: [0], order: "sync" }, /order/],
    ["hello.key that is not a key", { t: "hello", version: 1, key: "ssh-rsa AAAA" }, /key/],
    ["hello.nonce of 8 bytes", { t: "hello", version: 1, nonce: new Uint8Array(8) }, /nonce/],
    ["job.task.code as a string", { ...toProvider[1], task: { filename: "task.py", code: "import os" } }, /task\.code/],
    ["job.world_size 0", { ...toProvider[1], world_size: 0 }, /world_size/],
    ["job.ranks empty", { ...toProvider[1], ranks: [] }, /ranks/],
    ["ring.epoch 0 (the starting ring)", { t: "ring", epoch: 0, members: [0] }, /epoch/],
    ["ring.members empty", { t: "ring", epoch: 1, members: [] }, /members/],
    ["probe_links.bytes beyond 256 MiB", { t: "probe_links", bytes: 2 ** 30 }, /bytes/],
  ] as const)("rejects %s, naming the field", (_name, message, field) => {
    expectProtocolError(() => decodeToProvider(encode(message), "coordinator A"), /coordinator A/, /invalid message/, field);
  });

  it.each([
    ["report.rank missing", { ...toCoordinator[4], rank: undefined }, /rank/],
    ["report.bytes_sent negative", { ...toCoordinator[4], bytes_sent: -1 }, /bytes_sent/],
    ["welcome with no devices", { ...toCoordinator[0], provider: { ...(toCoordinator[0] as { provider: object }).provider, devices: [] } }, /provider\.devices/],
    ["report.payload as a string", { ...toCoordinator[4], payload: "AAAA" }, /payload/],
    ["failed.kind unknown", { t: "failed", message: "x", kind: "cosmic-ray" }, /kind/],
    ["link with a zero upload rate", { t: "link", rank: 0, to: 1, rtt_ms: 1, upload_bytes_per_s: 0 }, /upload_bytes_per_s/],
  ] as const)("rejects %s from a provider, naming the field", (_name, message, field) => {
    expectProtocolError(() => decodeToCoordinator(encode(message, { ignoreUndefined: true }), "provider ws://p:1"), /provider ws:\/\/p:1/, field);
  });

  it.each([
    ["step_done.loss as a string", { ...stepDone, loss: "0.5" }, /loss/],
    ["step_done.max_micro_batch 0", { ...stepDone, max_micro_batch: 0 }, /max_micro_batch/],
    ["a state file name with a slash", { op: "state", kind: "final", step: 1, files: [{ name: "../../etc/passwd", size: 0 }] }, /files\.0\.name/],
    ["eval_done.sums with a string", { op: "eval_done", step: 1, count: 1, sums: { accuracy: "1" } }, /sums\.accuracy/],
    ["a message its provider should have acted on", { op: "allgather", id: 0, size: 0 }, /should have acted on/],
  ] as const)("a coordinator rejects a report with %s, naming the rank and the field", (_name, report, field) => {
    const m = decodeToCoordinator(encode({ t: "report", rank: 2, bytes_sent: 0, report }), "provider ws://p:1");
    expectProtocolError(() => unpack(m, "provider ws://p:1"), /rank 2 \(provider ws:\/\/p:1\)|provider ws:\/\/p:1 passed on/, field);
  });

  it.each([
    ["step.step as a string", { op: "step", step: "1", shares: [1], want_hash: false }, /step/],
    ["step.step negative", { op: "step", step: -1, shares: [1], want_hash: false }, /step/],
    ["step.shares with a string", { op: "step", step: 1, shares: [1, "2"], want_hash: false }, /shares\.1/],
    ["step.want_hash as 0", { op: "step", step: 1, shares: [1], want_hash: 0 }, /want_hash/],
    ["state.kind unknown", { op: "state", kind: "everything" }, /kind/],
    ["eval.batch_size 0", { op: "eval", step: 0, start: 0, count: 1, batch_size: 0 }, /batch_size/],
    ["decide with an unknown verdict", { op: "decide", step: 1, verdict: "maybe" }, /verdict/],
    ["an order only the provider sends", { op: "stop" }, /not a worker operation it may send/],
  ] as const)("a provider rejects an order with %s, naming the field", (_name, order, field) => {
    expectProtocolError(() => parseOrder(order as Record<string, unknown>, 0, "coordinator A"), /coordinator A/, field);
  });

  it.each(["../x.py", "sub/task.py", "..\\x.py", "/etc/task.py", "task.txt", ".py", "a b.py"])("rejects the task filename %j", (filename) => {
    const job = { ...toProvider[1], task: { filename, code } };
    expectProtocolError(() => decodeToProvider(encode(job), "coordinator A"), /coordinator A/, /task\.filename/);
  });

  it("accepts ordinary task filenames", () => {
    for (const filename of ["task.py", "my_task-v2.py", "a.b.py"]) {
      const back = decodeToProvider(encodeMessage({ ...(toProvider[1] as Extract<ToProvider, { t: "job" }>), task: { filename, code } }));
      expect(back.t === "job" && back.task.filename).toBe(filename);
    }
  });

  describe("jobSpecProblem: what the schema cannot see", () => {
    const job = toProvider[1] as Extract<ToProvider, { t: "job" }>;
    const devices = [{ id: "cpu" }, { id: "cuda:0" }];
    it.each([
      ["a rank past the world size", { ranks: [{ rank: 3, device: "cpu" }] }, "the job names rank 3, which is not below its world_size 3"],
      ["one of this provider's ranks twice", { ranks: [{ rank: 0, device: "cpu" }, { rank: 0, device: "cpu" }] }, "the job names one of this provider's ranks twice"],
      ["a device this provider does not offer", { ranks: [{ rank: 0, device: "cuda:7" }] }, 'the job asks for device "cuda:7", which this provider does not offer (it offers cpu, cuda:0)'],
      ["a ring without every rank", { ring: job.ring.slice(0, 2) }, "the job's ring has 2 addresses for 3 ranks"],
      ["a ring address that is not a ring endpoint", { ring: [...job.ring.slice(0, 2), { rank: 2, url: "http://10.0.0.2/admin", key: proof.key }] }, 'the job\'s ring address "http://10.0.0.2/admin" is not a wss:// URL of a /ring endpoint'],
      ["a ring address with credentials", { ring: [...job.ring.slice(0, 2), { rank: 2, url: "wss://u:p@10.0.0.2/ring", key: proof.key }] }, /not a wss:\/\/ URL/],
    ] as const)("refuses %s", (_what, change, problem) => {
      const got = jobSpecProblem({ ...job, ...change } as typeof job, devices);
      if (typeof problem === "string") expect(got).toBe(problem);
      else expect(got).toMatch(problem);
    });
    it("accepts a well-formed job", () => expect(jobSpecProblem(job, devices)).toBeNull());
  });
});
