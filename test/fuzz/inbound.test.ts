/**
 * Property-based fuzzing (fast-check, fixed seed, bounded runs) of everything that arrives
 * from outside: control messages both ways, worker orders and reports, ring frames, and a
 * live provider hammered over real sockets, which must stay within bounded memory and then
 * still run a job.
 */
import { encode } from "@msgpack/msgpack";
import path from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import { ProtocolError } from "../../src/errors.js";
import { unpack } from "../../src/job/coordinator/answers.js";
import { Provider } from "../../src/job/provider/index.js";
import { decodeFrame } from "../../src/protocol/frames.js";
import { decodeToCoordinator, decodeToProvider, encodeMessage, jobSpecProblem, PROTOCOL_VERSION, type ToCoordinator, type ToProvider } from "../../src/protocol/messages.js";
import { parseFromWorker, parseOrder } from "../../src/protocol/workerOps.js";
import { resolvePython, type PythonEnv } from "../../src/runtime/python.js";
import { testPython } from "../helpers/processes.js";
import { coordinatorHello, openTls, TEST_COORDINATOR } from "../helpers/tls.js";
import { ephemeralIdentity } from "../../src/identity/identity.js";
import { issueCredential } from "../../src/identity/proof.js";
import { tinyTask } from "../helpers/tasks.js";

const SEED = 20261201;
const PROVIDER = ephemeralIdentity();
const RUNS = 400;

/** Only a ProtocolError may come out of a parser fed from outside: never a crash of another kind. */
function onlyProtocolErrors(fn: () => unknown): void {
  try {
    fn();
  } catch (err) {
    if (!(err instanceof ProtocolError)) throw err;
  }
}

const T_TO_PROVIDER = ["hello", "job", "order", "ring", "probe_links", "cancel"];
const T_TO_COORDINATOR = ["welcome", "reject", "ready", "ring_ready", "ring_lost", "report", "link", "log", "failed"];
const OPS = ["init", "sync", "ring", "sync_state", "decide", "eval", "state", "load_state", "set_speed", "stop", "step", "allreduce", "allgather", "ready", "synced", "synced_state", "decided", "step_done", "eval_done", "loaded", "error", "nope"];

/** Values shaped like the messages, with fields of every type. */
const value = fc.letrec((tie) => ({
  leaf: fc.oneof(fc.integer(), fc.double(), fc.string({ maxLength: 40 }), fc.boolean(), fc.constant(null), fc.uint8Array({ maxLength: 64 })),
  tree: fc.oneof({ depthSize: "small" }, tie("leaf"), fc.array(tie("tree"), { maxLength: 4 }), fc.dictionary(fc.string({ maxLength: 12 }), tie("tree"), { maxKeys: 5 })),
})).tree;
const messageLike = (kinds: string[], key: string) =>
  fc.record({ kind: fc.constantFrom(...kinds), rest: fc.dictionary(fc.constantFrom("rank", "ranks", "order", "report", "payload", "step", "files", "token", "version", "epoch", "members", "bytes", "message", "kind", "line", "info", "shares"), value, { maxKeys: 6 }) }).map(({ kind, rest }) => ({ ...rest, [key]: kind }));

describe("fuzz: parsers of inbound messages", () => {
  const params = { seed: SEED, numRuns: RUNS };

  it("control messages to a provider and to a coordinator: parsed, or refused with a ProtocolError", () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 256 }), (bytes) => onlyProtocolErrors(() => decodeToProvider(bytes, "fuzz"))), params);
    fc.assert(fc.property(messageLike(T_TO_PROVIDER, "t"), (m) => onlyProtocolErrors(() => decodeToProvider(encode(m), "fuzz"))), params);
    fc.assert(fc.property(messageLike(T_TO_COORDINATOR, "t"), (m) => onlyProtocolErrors(() => unpack(decodeToCoordinator(encode(m), "fuzz"), "fuzz"))), params);
  });

  it("worker orders and reports: parsed, or refused with a ProtocolError", () => {
    fc.assert(
      fc.property(messageLike(OPS, "op"), fc.nat(4096), (order, bytes) => onlyProtocolErrors(() => parseOrder(order as Record<string, unknown>, bytes, "fuzz"))),
      params,
    );
    fc.assert(
      fc.property(messageLike(OPS, "op"), fc.uint8Array({ maxLength: 64 }), (header, payload) =>
        onlyProtocolErrors(() => parseFromWorker({ header: header as Record<string, unknown>, payload }, "fuzz")),
      ),
      params,
    );
  });

  it("ring frames: decoded, or refused with an error naming what is wrong", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 512 }), (bytes) => {
        try {
          decodeFrame(bytes);
        } catch (err) {
          expect(err).toBeInstanceOf(Error);
          expect((err as Error).message.length).toBeGreaterThan(0);
        }
      }),
      params,
    );
  });
});

describe("fuzz: the job spec a provider is sent", () => {
  const DEVICES = [{ id: "cpu" }, { id: "cuda:0" }];
  const valid = {
    t: "job",
    job: "j",
    credential: issueCredential(TEST_COORDINATOR, "j", PROVIDER.key, [0]),
    task: { filename: "task.py", code: new Uint8Array([120, 61, 49]) },
    config: { name: "x", task: "task.py", steps: 1, batch_size: 8 },
    world_size: 2,
    ranks: [{ rank: 0, device: "cpu" }],
    ring: [
      { rank: 0, url: "wss://127.0.0.1:1/ring", key: PROVIDER.key },
      { rank: 1, url: "wss://10.0.0.2:7000/ring", key: TEST_COORDINATOR.key },
    ],
  };
  const hostile = fc.constantFrom<unknown>(
    "../task.py", "/etc/passwd", "..", ".", "task.py/..", "a\u0000.py", "x".repeat(300), "file:///etc/passwd", "http://127.0.0.1/ring",
    "ws://u:p@127.0.0.1/ring", "ws://127.0.0.1/other", "ws://127.0.0.1:1/ring", "cuda:7", -1, 2 ** 53, 1e308, Number.NaN, [], {}, null, [{ rank: 0, device: "cpu" }, { rank: 0, device: "cpu" }],
  );
  const FIELDS = ["job", "credential", "credential.sig", "ring.0.key", "task.filename", "task.code", "config", "world_size", "ranks", "ranks.0.rank", "ranks.0.device", "ring", "ring.0.rank", "ring.1.url", "threads", "join"];
  const mutated = fc.array(fc.record({ field: fc.constantFrom(...FIELDS), to: fc.oneof(hostile, value) }), { minLength: 1, maxLength: 3 }).map((edits) => {
    const spec = structuredClone(valid) as Record<string, unknown>;
    for (const { field, to } of edits) {
      const keys = field.split(".");
      let at = spec as Record<string, unknown>;
      for (const k of keys.slice(0, -1)) at = (typeof at[k] === "object" && at[k] !== null ? at[k] : (at[k] = {})) as Record<string, unknown>;
      at[keys.at(-1)!] = to;
    }
    return spec;
  });

  it("is refused with a reason, or is safe to act on: a plain task file name, ranks in range and once, offered devices, ring URLs only", () => {
    expect(jobSpecProblem(decodeToProvider(encode(valid), "fuzz") as Extract<ToProvider, { t: "job" }>, DEVICES)).toBeNull();
    let accepted = 0;
    fc.assert(
      fc.property(mutated, (spec) => {
        let job: Extract<ToProvider, { t: "job" }>;
        try {
          job = decodeToProvider(encode(spec), "fuzz") as Extract<ToProvider, { t: "job" }>;
        } catch (err) {
          expect(err).toBeInstanceOf(ProtocolError);
          return;
        }
        const problem = jobSpecProblem(job, DEVICES);
        if (problem !== null) {
          expect(problem.length).toBeGreaterThan(0);
          return;
        }
        accepted++;
        expect(job.task.filename).toMatch(/^[A-Za-z0-9._-]+\.py$/);
        expect(path.basename(job.task.filename)).toBe(job.task.filename);
        for (const r of [...job.ranks, ...job.ring]) expect(r.rank).toBeLessThan(job.world_size);
        expect(new Set(job.ranks.map((r) => r.rank)).size).toBe(job.ranks.length);
        for (const r of job.ranks) expect(["cpu", "cuda:0"]).toContain(r.device);
        for (const r of job.ring) expect(r.url).toMatch(/^wss:\/\/[^/@]+\/ring$/);
      }),
      { seed: SEED, numRuns: RUNS },
    );
    expect(accepted).toBeGreaterThan(0); // the property saw specs that pass, not only refusals
  });
});

describe("fuzz: a live provider over real sockets", () => {
  let python: PythonEnv;
  let provider: Provider;
  let port = 0;
  const TOKEN = "fuzz-token";
  beforeAll(async () => {
    python = await resolvePython({ env: { NIMBLE_PYTHON: await testPython() } });
    provider = new Provider({ host: "127.0.0.1", port: 0, identity: PROVIDER, token: TOKEN, python, devices: python.probe!.devices, threads: 1, onEvent: () => {} });
    port = (await provider.start()).port;
  }, 600_000);
  afterAll(async () => provider?.close());

  function connect(path: string): Promise<WebSocket> {
    const ws = openTls(`wss://127.0.0.1:${port}${path}`, { maxPayload: 1 << 30 });
    ws.on("error", () => {});
    return new Promise((resolve) => {
      ws.once("open", () => resolve(ws));
      ws.once("error", () => resolve(ws));
    });
  }

  it("survives random messages on /control (before and after a hello) and /ring within bounded memory, then runs a job", async () => {
    const before = process.memoryUsage().rss;
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom("/control", "/control+hello", "/ring"),
        fc.array(fc.oneof(messageLike(T_TO_PROVIDER, "t").map((m) => Buffer.from(encode(m))), fc.uint8Array({ maxLength: 2048 }).map((b) => Buffer.from(b))), { maxLength: 6 }),
        async (where, messages) => {
          const ws = await connect(where === "/ring" ? "/ring" : "/control");
          if (ws.readyState !== WebSocket.OPEN) return;
          if (where === "/control+hello") ws.send(encodeMessage(coordinatorHello(ws, TEST_COORDINATOR, TOKEN)));
          for (const m of messages) ws.send(m);
          await new Promise((r) => setTimeout(r, 5));
          ws.terminate();
        },
      ),
      { seed: SEED, numRuns: 150 },
    );
    expect(process.memoryUsage().rss - before).toBeLessThan(256 * 1024 * 1024);
    // Still a working provider: a job loads, forms its ring, and trains a step.
    const ws = await connect("/control");
    const got: ToCoordinator[] = [];
    ws.on("message", (d) => got.push(decodeToCoordinator(d, "provider")));
    const next = async (t: string) => {
      for (let i = 0; i < 1500; i++) {
        const at = got.findIndex((m) => m.t === t);
        if (at >= 0) return got.splice(at, 1)[0]!;
        await new Promise((r) => setTimeout(r, 40));
      }
      throw new Error(`no ${t}; got ${got.map((m) => m.t).join(", ")}`);
    };
    ws.send(encodeMessage(coordinatorHello(ws, TEST_COORDINATOR, TOKEN)));
    await next("welcome");
    const task = tinyTask({ train: 64, val: 16 });
    ws.send(
      encodeMessage({
        t: "job",
        job: "after-fuzz",
        credential: issueCredential(TEST_COORDINATOR, "after-fuzz", PROVIDER.key, [0]),
        task: { filename: "task.py", code: new TextEncoder().encode(task) },
        config: { name: "fuzz", task: "task.py", task_args: {}, steps: 1, batch_size: 8, seed: 0, compression: { method: "none" } },
        world_size: 1,
        ranks: [{ rank: 0, device: python.probe!.devices[0]!.id }],
        ring: [{ rank: 0, url: `wss://127.0.0.1:${port}/ring`, key: PROVIDER.key }],
        threads: 1,
      }),
    );
    await next("ready");
    await next("ring_ready");
    ws.send(encodeMessage({ t: "order", ranks: [0], order: { op: "step", step: 0, shares: [8], want_hash: true } }));
    const report = (await next("report")) as Extract<ToCoordinator, { t: "report" }>;
    expect(report.report).toMatchObject({ op: "step_done", step: 0, samples: 8, skipped: false });
    ws.close();
  }, 300_000);
});
