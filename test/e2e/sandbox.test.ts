/**
 * A hostile task on a confined provider (issue "Trust 3 of 3"): it tries to read files
 * planted in the provider's home and in another job's folder, to write outside its own
 * folder, to connect to a port on the host's loopback, to find the provider's token in its
 * environment or in any command line it can see, and to fork without bound. Each attempt
 * must fail, and the job must still train. Then --max-memory: a worker that allocates past
 * it is ended with a named fault.
 */
import { existsSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { tinyTask } from "../helpers/tasks.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const TOKEN = "sandbox-token-2b7e151628aed2a6";

const PROBES = `
import json, os, socket

def _probe(name, fn):
    try:
        detail = fn()
        print(f"PROBE {name}: OPEN {detail}", flush=True)
    except Exception as e:
        print(f"PROBE {name}: blocked ({type(e).__name__})", flush=True)

def _find_token(token):
    seen = [v for v in os.environ.values() if token in v]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        seen.append(pid)
            except OSError:
                pass
    if seen:
        return seen
    raise PermissionError("not found")

def _fork_bomb(limit):
    children = []
    try:
        for _ in range(limit):
            pid = os.fork()
            if pid == 0:
                import time
                time.sleep(20)
                os._exit(0)
            children.append(pid)
        return f"forked {len(children)}"
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)

_build = build_model

def build_model(args):
    p = args["probe"]
    _probe("read-home", lambda: open(p["home_secret"]).read())
    _probe("read-other-job", lambda: open(p["other_job_secret"]).read())
    def write():
        with open(p["outside"], "w") as f:
            f.write("escaped")
        return p["outside"]
    _probe("write-outside", write)
    _probe("connect-local", lambda: socket.create_connection(("127.0.0.1", p["port"]), timeout=2))
    _probe("find-token", lambda: _find_token(p["token"]))
    _probe("fork-bomb", lambda: _fork_bomb(2000))
    print("PROBE whoami: " + json.dumps({"uid": os.getuid(), "cwd": os.getcwd(), "env": sorted(os.environ)}), flush=True)
    return _build(args)
`;

describe("a confined provider against a hostile task", () => {
  it("blocks every attempt and still trains", async () => {
    const home = path.join(tmp.dir, "home");
    await mkdir(home, { recursive: true });
    await writeFile(path.join(home, "secret.txt"), "home secret");
    const otherJob = "/tmp/nimble-job-planted-by-test";
    await mkdir(otherJob, { recursive: true });
    await writeFile(path.join(otherJob, "secret.txt"), "other job's secret");
    const outside = path.join(tmp.dir, "escaped.txt");
    let connections = 0;
    const server = net.createServer((s) => {
      connections++;
      s.destroy();
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
    const port = (server.address() as net.AddressInfo).port;
    // The worst case: the token in the provider's argv and environment.
    const provider = await startProvider(python, TOKEN, ["--max-processes", "128"], { env: { ...process.env, HOME: home, NIMBLE_TOKEN: TOKEN } });
    try {
      await writeFile(path.join(tmp.dir, "task.py"), tinyTask({ train: 64, val: 16, extra: PROBES }));
      const probe = { home_secret: path.join(home, "secret.txt"), other_job_secret: path.join(otherJob, "secret.txt"), outside, port, token: TOKEN };
      const config = path.join(tmp.dir, "nimble.yaml");
      await writeFile(
        config,
        [
          "name: hostile",
          "task: task.py",
          `task_args: {probe: ${JSON.stringify(probe)}}`,
          "steps: 3",
          "batch_size: 16",
          "compression: {method: none}",
          `output: ${path.join(tmp.dir, "runs")}`,
          "providers:",
          `  - {address: "${provider.address}", token: ${TOKEN}}`,
        ].join("\n") + "\n",
      );
      const run = await nimble(["train", config, "--json", "--python", python], { timeout: 240_000 });
      expect(run.exitCode, String(run.stderr)).toBe(0);
      const done = String(run.stdout).trim().split("\n").map((l) => JSON.parse(l)).find((e) => e.type === "done");
      const log = await readFile(path.join(done.run_dir, "train.log"), "utf8");
      const probes = Object.fromEntries([...log.matchAll(/PROBE ([a-z-]+): (.*)/g)].map((m) => [m[1], m[2]]));
      for (const name of ["read-home", "read-other-job", "write-outside", "connect-local", "find-token", "fork-bomb"]) {
        expect(probes[name], `${name}: ${probes[name]}`).toMatch(/^blocked/);
      }
      const who = JSON.parse(probes.whoami!);
      expect(who.uid).toBe(65534);
      expect(who.env).not.toContain("NIMBLE_TOKEN");
      expect(existsSync(outside)).toBe(false);
      expect(connections).toBe(0);
      const summary = JSON.parse(await readFile(path.join(done.run_dir, "summary.json"), "utf8"));
      expect(summary.steps).toBe(3);
    } finally {
      server.close();
      provider.child.kill("SIGTERM");
    }
  }, 300_000);

  it("--max-memory: a worker that allocates past it is ended with a named fault, and the job goes on without it", async () => {
    const hog = tinyTask({
      train: 128,
      val: 32,
      extra: `
_hog = []
_calls = 0
def compute_loss(model, batch):
    global _calls
    _calls += 1
    if os.environ.get("NIMBLE_RANK") == "1" and _calls == 2:
        _hog.append(torch.ones(400_000_000))  # 1.6 GB, touched
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)
`,
    });
    const dir = path.join(tmp.dir, "hog");
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, "task.py"), hog);
    const providers = [await startProvider(python, "hog-a"), await startProvider(python, "hog-b", ["--max-memory", "1GB"])];
    try {
      const config = path.join(dir, "nimble.yaml");
      await writeFile(
        config,
        [
          "name: hog",
          "task: task.py",
          "steps: 6",
          "batch_size: 16",
          "compression: {method: none}",
          "faults: {heartbeat_s: 3}",
          `output: ${path.join(dir, "runs")}`,
          "providers:",
          ...providers.map((p, i) => `  - {address: "${p.address}", token: hog-${"ab"[i]}}`),
        ].join("\n") + "\n",
      );
      const run = await nimble(["train", config, "--json", "--python", python], { timeout: 240_000 });
      expect(run.exitCode, String(run.stderr)).toBe(0);
      const done = String(run.stdout).trim().split("\n").map((l) => JSON.parse(l)).find((e) => e.type === "done");
      const summary = JSON.parse(await readFile(path.join(done.run_dir, "summary.json"), "utf8"));
      expect(summary.steps).toBe(6);
      expect(summary.faults.map((f: { ranks: number[] }) => f.ranks)).toEqual([[1]]);
      expect(summary.faults[0].reason).toMatch(/worker for rank 1 on \S+ went past the owner's memory limit \(--max-memory 1(\.0)? GB.*\), so it leaves the job/);
    } finally {
      for (const p of providers) p.child.kill("SIGTERM");
    }
  }, 300_000);
});
