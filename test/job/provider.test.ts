import { readlink } from "node:fs/promises";
import { existsSync } from "node:fs";
import { execa } from "execa";
import WebSocket from "ws";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { Provider, type ProviderEvent } from "../../src/job/provider/index.js";
import { ProviderClient } from "../../src/job/providerClient.js";
import { ephemeralIdentity } from "../../src/identity/identity.js";
import { issueCredential, prove } from "../../src/identity/proof.js";
import { closeTlsServer, coordinatorHello, openTls, startTlsServer, TEST_COORDINATOR } from "../helpers/tls.js";
import { httpsGet } from "../helpers/https.js";
import { decodeToCoordinator, encodeMessage, PROTOCOL_VERSION, type ToCoordinator, type ToProvider } from "../../src/protocol/messages.js";
import { resolvePython, type PythonEnv } from "../../src/runtime/python.js";
import { testPython } from "../helpers/processes.js";
import { tinyTask } from "../helpers/tasks.js";

const TOKEN = "provider-test-token";
const PROVIDER = ephemeralIdentity();

const GOOD_TASK = tinyTask({ train: 64, val: 16 });

// A later definition wins: this task's build_model raises.
const BAD_TASK = tinyTask({
  extra: `
def build_model(args):
    raise RuntimeError("no model today")
`,
});

let python: PythonEnv;
beforeAll(async () => {
  // /tmp/venv-probe/bin/python via NIMBLE_PYTHON, or the managed environment.
  python = await resolvePython({ env: { NIMBLE_PYTHON: await testPython() } });
}, 600_000);

let provider: Provider | null = null;
let events: ProviderEvent[] = [];
let port = 0;
const sockets: WebSocket[] = [];

afterEach(async () => {
  for (const ws of sockets.splice(0)) ws.terminate();
  await provider?.close();
  provider = null;
});

async function startProvider(): Promise<void> {
  events = [];
  provider = new Provider({
    host: "127.0.0.1",
    port: 0,
    identity: PROVIDER,
    token: TOKEN,
    python,
    devices: python.probe!.devices,
    threads: 1,
    onEvent: (e) => events.push(e),
  });
  port = (await provider.start()).port;
  expect(port).toBeGreaterThan(0);
}

/** A raw control-plane client: every message it receives, and how the connection closed. */
class RawClient {
  readonly messages: ToCoordinator[] = [];
  readonly closed: Promise<{ code: number; reason: string }>;
  private waiters: (() => void)[] = [];

  constructor(readonly ws: WebSocket) {
    sockets.push(ws);
    ws.on("message", (data, isBinary) => {
      this.messages.push(decodeToCoordinator(isBinary ? data : String(data), "provider under test"));
      for (const w of this.waiters.splice(0)) w();
    });
    this.closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
    ws.on("error", () => {});
  }

  static async open(path = "/control"): Promise<RawClient> {
    const ws = openTls(`wss://127.0.0.1:${port}${path}`);
    const client = new RawClient(ws);
    await new Promise<void>((resolve, reject) => {
      ws.once("open", () => resolve());
      ws.once("error", reject);
    });
    return client;
  }

  send(m: ToProvider) {
    this.ws.send(encodeMessage(m));
  }

  /** Messages before this index were consumed by earlier next() calls. */
  private cursor = 0;

  /** Resolves with the first not yet consumed message (already received or to come) of kind t, consuming up to it. */
  async next<T extends ToCoordinator["t"]>(t: T, timeoutMs = 60_000) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const rest = this.messages.slice(this.cursor);
      const at = rest.findIndex((m) => m.t === t);
      if (at >= 0) {
        this.cursor += at + 1;
        return rest[at] as Extract<ToCoordinator, { t: T }>;
      }
      const failed = rest.find((m) => m.t === "failed");
      if (failed && t !== "failed") throw new Error(`provider sent failed while waiting for ${t}: ${JSON.stringify(failed)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no ${t} within ${timeoutMs} ms; got ${JSON.stringify(this.messages.map((m) => m.t))}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }
}

async function welcomed(): Promise<RawClient & { welcome: Extract<ToCoordinator, { t: "welcome" }> }> {
  const client = await RawClient.open();
  client.send(coordinatorHello(client.ws, TEST_COORDINATOR, TOKEN, PROTOCOL_VERSION));
  const welcome = await client.next("welcome", 10_000);
  return Object.assign(client, { welcome });
}

function jobSpec(id: string, task: string, filename = "task.py"): ToProvider {
  return {
    t: "job",
    job: id,
    credential: issueCredential(TEST_COORDINATOR, id, PROVIDER.key, [0]),
    task: { filename, code: new TextEncoder().encode(task) },
    config: { name: "provider-test", task: filename, task_args: {}, steps: 3, batch_size: 8, seed: 0 },
    world_size: 1,
    ranks: [{ rank: 0, device: python.probe!.devices[0].id }],
    ring: [{ rank: 0, url: `wss://127.0.0.1:${port}/ring`, key: PROVIDER.key }],
    threads: 1,
  };
}

/** Python workers this test process's provider started (they are its direct children). */
async function myWorkers(): Promise<number[]> {
  const ps = await execa("ps", ["-eo", "pid=,ppid=,args="]);
  return String(ps.stdout)
    .split("\n")
    .map((l) => l.trim().split(/\s+/))
    .filter(([, ppid, ...args]) => Number(ppid) === process.pid && args.join(" ").includes("nimble_worker"))
    .map(([pid]) => Number(pid));
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string) {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe("Provider control plane", () => {
  it("answers a wrong token with a reject message and close code 4001", async () => {
    await startProvider();
    const client = await RawClient.open();
    client.send(coordinatorHello(client.ws, TEST_COORDINATOR, "not-the-token", PROTOCOL_VERSION));
    const closed = await client.closed;
    expect(closed.code).toBe(4001);
    expect(client.messages).toEqual([{ t: "reject", reason: "wrong token" }]);
    expect(events.some((e) => e.type === "log" && /wrong token/.test(e.line))).toBe(true);
  });

  it("refuses a replayed hello: one proved on another TLS session", async () => {
    await startProvider();
    const recorded = await RawClient.open();
    const hello = coordinatorHello(recorded.ws, TEST_COORDINATOR, TOKEN);
    const replay = await RawClient.open();
    replay.send(hello);
    expect((await replay.closed).code).toBe(4001);
    expect(replay.messages).toEqual([{ t: "reject", reason: "bad proof" }]);
  });

  it("a man in the middle with its own certificate gets nowhere, in token mode and in key mode", async () => {
    await startProvider();
    // A TLS-terminating relay: the coordinator's TLS session ends at the proxy, which opens its own to the provider.
    const proxy = await startTlsServer(ephemeralIdentity());
    const relayed: string[] = [];
    proxy.server.on("connection", (inbound) => {
      const outbound = openTls(`wss://127.0.0.1:${port}/control`);
      const queue: Buffer[] = [];
      inbound.on("message", (d) => {
        relayed.push("hello");
        if (outbound.readyState === WebSocket.OPEN) outbound.send(d);
        else queue.push(d as Buffer);
      });
      outbound.on("open", () => queue.splice(0).forEach((d) => outbound.send(d)));
      outbound.on("message", (d) => inbound.send(d));
      outbound.on("close", (code) => inbound.close(code === 1005 ? 1000 : code));
      outbound.on("error", () => {});
    });
    const address = `127.0.0.1:${proxy.port}`;
    try {
      // Token mode: the relayed proof is bound to the coordinator's session with the proxy, not the proxy's with the provider.
      await expect(ProviderClient.connect(address, { identity: TEST_COORDINATOR, token: TOKEN })).rejects.toThrow(/refused the job: bad proof/);
      expect(events.some((e) => e.type === "log" && /rejected coordinator .*: bad proof/.test(e.line))).toBe(true);
      // Key mode: the proxy's certificate is not the provider's key; nothing is sent to it.
      const before = relayed.length;
      await expect(ProviderClient.connect(address, { identity: TEST_COORDINATOR, key: PROVIDER.key })).rejects.toThrow(/certificate's key .* is not the expected/);
      expect(relayed.length).toBe(before);
      // The provider itself is fine with the real thing.
      const direct = await ProviderClient.connect(`127.0.0.1:${port}`, { identity: TEST_COORDINATOR, key: PROVIDER.key, token: TOKEN });
      expect(direct.key).toBe(PROVIDER.key);
      direct.close();
    } finally {
      await closeTlsServer(proxy);
    }
  });

  it("refuses a coordinator of another protocol version, naming both (close code 4002)", async () => {
    await startProvider();
    const client = await RawClient.open();
    client.send(coordinatorHello(client.ws, TEST_COORDINATOR, TOKEN, PROTOCOL_VERSION - 1));
    expect((await client.closed).code).toBe(4002);
    expect(client.messages).toEqual([
      {
        t: "reject",
        reason: `protocol mismatch: the coordinator speaks protocol ${PROTOCOL_VERSION - 1}, this provider speaks ${PROTOCOL_VERSION} (run the same nimble version on both sides)`,
      },
    ]);
  });

  it("a coordinator refuses a provider of another protocol version", async () => {
    const other = ephemeralIdentity();
    const fake = await startTlsServer(other);
    const proof = prove(other, "control-provider", Buffer.alloc(32));
    fake.server.on("connection", (ws) => ws.on("message", () => ws.send(encodeMessage({ t: "welcome", ...proof, version: PROTOCOL_VERSION + 1, provider: { id: "x", hostname: "x", python: "3", torch: "2", devices: [{ id: "cpu", kind: "cpu", name: "cpu" }] } }))));
    const address = `127.0.0.1:${fake.port}`;
    try {
      await expect(ProviderClient.connect(address, { identity: TEST_COORDINATOR, token: TOKEN })).rejects.toThrow(`Provider ${address} speaks protocol ${PROTOCOL_VERSION + 1}, this nimble speaks ${PROTOCOL_VERSION}`);
    } finally {
      await closeTlsServer(fake);
    }
  });

  it("rejects a MAC made with a prefix of the token", async () => {
    await startProvider();
    const client = await RawClient.open();
    client.send(coordinatorHello(client.ws, TEST_COORDINATOR, TOKEN.slice(0, -1)));
    expect((await client.closed).code).toBe(4001);
  });

  it("closes with 4000 on bytes that are not a control message", async () => {
    await startProvider();
    const client = await RawClient.open();
    client.ws.send(Buffer.from([0xc1, 0xff, 0x00, 0x13, 0x37]));
    expect((await client.closed).code).toBe(4000);
    expect(client.messages).toEqual([]);
  });

  it("closes with 4000 on a text frame, and on a valid message other than hello before authenticating", async () => {
    await startProvider();
    const text = await RawClient.open();
    text.ws.send(JSON.stringify({ t: "hello", token: TOKEN, version: PROTOCOL_VERSION }));
    expect((await text.closed).code).toBe(4000);
    const early = await RawClient.open();
    early.send(jobSpec("sneaky", GOOD_TASK));
    expect((await early.closed).code).toBe(4000);
    expect(events.some((e) => e.type === "job")).toBe(false);
  });

  it("closes with 4000 on garbage after authenticating, ending nothing else", async () => {
    await startProvider();
    const client = await welcomed();
    client.ws.send(Buffer.from("definitely not msgpack \xc1"));
    expect((await client.closed).code).toBe(4000);
    // The provider is still serving.
    await welcomed();
  });

  it("welcomes a coordinator proving the token with its devices, python and torch versions", async () => {
    await startProvider();
    const client = await welcomed();
    const { welcome } = client;
    expect(client.messages).toEqual([welcome]);
    expect(welcome.version).toBe(PROTOCOL_VERSION);
    expect(welcome.provider.devices).toEqual(python.probe!.devices);
    expect(welcome.provider.torch).toBe(python.torchVersion);
    expect(welcome.provider.python).toBe(python.pythonVersion);
    expect(client.ws.readyState).toBe(WebSocket.OPEN);
  });

  it("answers a plain HTTPS request with 426 Upgrade Required", async () => {
    await startProvider();
    const res = await httpsGet(`https://127.0.0.1:${port}/`);
    expect(res.status).toBe(426);
    expect(res.body).toMatch(/WebSocket/);
    const control = await httpsGet(`https://127.0.0.1:${port}/control`);
    expect(control.status).toBe(426);
  });

  it("refuses a WebSocket on an unknown path", async () => {
    await startProvider();
    await expect(RawClient.open("/elsewhere")).rejects.toThrow(/404/);
  });

  it("refuses a second coordinator with busy while a job runs", async () => {
    await startProvider();
    const first = await welcomed();
    first.send(jobSpec("job-busy", GOOD_TASK));
    const ready = await first.next("ready", 120_000);
    expect(ready.rank).toBe(0);
    expect(ready.info).toMatchObject({ params: 10, train_size: 64, val_size: 16 });

    const second = await RawClient.open();
    second.send(coordinatorHello(second.ws, TEST_COORDINATOR, TOKEN, PROTOCOL_VERSION));
    const closed = await second.closed;
    expect(closed.code).toBe(4009);
    expect(second.messages).toHaveLength(1);
    expect(second.messages[0]).toMatchObject({ t: "reject" });
    expect((second.messages[0] as { reason: string }).reason).toMatch(/busy/);
    expect((second.messages[0] as { reason: string }).reason).toContain("job-busy");
    // The first coordinator's job was not disturbed.
    expect(first.ws.readyState).toBe(WebSocket.OPEN);
    expect(first.messages.some((m) => m.t === "failed")).toBe(false);

    // One coordinator per job: a cancel pipelined behind a hello that is turned away as busy
    // does not reach the running job.
    const third = await RawClient.open();
    third.send(coordinatorHello(third.ws, TEST_COORDINATOR, TOKEN, PROTOCOL_VERSION));
    third.send({ t: "cancel", reason: "not yours" });
    expect((await third.closed).code).toBe(4009);
    await new Promise((r) => setTimeout(r, 300));
    expect(events.some((e) => e.type === "job_end")).toBe(false);
    expect(first.ws.readyState).toBe(WebSocket.OPEN);
  }, 180_000);

  it("runs a task named like a module the worker imports (torch.py): it shadows nothing", async () => {
    await startProvider();
    const client = await welcomed();
    client.send(jobSpec("job-torch-named", GOOD_TASK, "torch.py"));
    const ready = await client.next("ready", 120_000);
    expect(ready.info).toMatchObject({ train_size: 64 });
  }, 180_000);

  it("refuses a job spec that names ranks the job does not have", async () => {
    await startProvider();
    const client = await welcomed();
    const spec = jobSpec("job-bad-rank", GOOD_TASK) as Extract<ToProvider, { t: "job" }>;
    client.send({ ...spec, ranks: [{ rank: 3, device: spec.ranks[0].device }] });
    const failed = await client.next("failed");
    expect(failed.message).toBe("the job names rank 3, which is not below its world_size 1");
    expect(events.some((e) => e.type === "job")).toBe(false);
  });

  it("reports a task whose build_model raises as failed/task naming the file and function, and its worker is gone", async () => {
    await startProvider();
    const client = await welcomed();
    const seen = new Set<number>();
    const jobDirs = new Set<string>();
    let polling = true;
    const poll = (async () => {
      while (polling) {
        for (const pid of await myWorkers()) {
          seen.add(pid);
          if (process.platform === "linux") {
            const cwd = await readlink(`/proc/${pid}/cwd`).catch(() => "");
            if (cwd) jobDirs.add(cwd);
          }
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    client.send(jobSpec("job-bad", BAD_TASK, "bad_task.py"));
    const failed = await client.next("failed", 120_000);
    polling = false;
    await poll;
    expect(failed.kind).toBe("task");
    expect(failed.rank).toBe(0);
    expect(failed.where).toContain("bad_task.py");
    expect(failed.where).toContain("build_model");
    expect(failed.message).toContain("no model today");

    // The worker was running (this check can see it) and is gone now; its job folder too.
    expect(seen.size).toBe(1);
    await waitFor(async () => [...seen].every((pid) => !alive(pid)) && (await myWorkers()).length === 0, 10_000, "the worker to exit");
    await waitFor(() => events.some((e) => e.type === "job_end" && e.job === "job-bad"), 10_000, "job_end");
    for (const dir of jobDirs) expect(existsSync(dir)).toBe(false);
    // The provider takes the next job on the same connection.
    client.send(jobSpec("job-after-failure", GOOD_TASK));
    await client.next("ready", 120_000);
  }, 180_000);

  it("after cancel, stops the job's worker and accepts a new job", async () => {
    await startProvider();
    const client = await welcomed();
    client.send(jobSpec("job-1", GOOD_TASK));
    await client.next("ready", 120_000);
    const workers = await myWorkers();
    expect(workers).toHaveLength(1);

    client.send({ t: "cancel", reason: "user pressed Ctrl-C" });
    await waitFor(() => events.some((e) => e.type === "job_end" && e.job === "job-1"), 15_000, "job_end after cancel");
    const end = events.find((e) => e.type === "job_end" && e.job === "job-1");
    expect(end).toMatchObject({ reason: expect.stringContaining("user pressed Ctrl-C") });
    await waitFor(() => !alive(workers[0]), 10_000, "the cancelled worker to exit");
    // Cancel is not a failure.
    expect(client.messages.some((m) => m.t === "failed")).toBe(false);

    client.send(jobSpec("job-2", GOOD_TASK));
    const ready = await client.next("ready", 120_000);
    expect(ready.rank).toBe(0);
    expect(client.messages.filter((m) => m.t === "ready")).toHaveLength(2);
    const now = await myWorkers();
    expect(now).toHaveLength(1);
    expect(now[0]).not.toBe(workers[0]);
  }, 240_000);

  it("after cancel, a new coordinator is welcomed", async () => {
    await startProvider();
    const client = await welcomed();
    client.send(jobSpec("job-x", GOOD_TASK));
    await client.next("ready", 120_000);
    client.send({ t: "cancel", reason: "done" });
    await waitFor(() => events.some((e) => e.type === "job_end"), 15_000, "job_end");
    client.ws.close();
    await welcomed();
  }, 180_000);

  it("ends the job and stops its worker when the coordinator disconnects", async () => {
    await startProvider();
    const client = await welcomed();
    client.send(jobSpec("job-dc", GOOD_TASK));
    await client.next("ready", 120_000);
    const [pid] = await myWorkers();
    expect(pid).toBeGreaterThan(0);
    client.ws.terminate();
    await waitFor(() => events.some((e) => e.type === "job_end" && e.job === "job-dc"), 15_000, "job_end after disconnect");
    await waitFor(() => !alive(pid), 10_000, "the worker to exit");
  }, 180_000);
});
