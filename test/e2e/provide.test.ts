import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { forEachLine } from "../../src/runtime/lines.js";
import { nimble, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { tinyTask } from "../helpers/tasks.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

type Event = { type: string; [key: string]: any };

/** A provider started with --json (stdout a pipe, as for any service), and every event it prints from now on. */
async function providerWithEvents(token: string) {
  const p = await startProvider(python, token);
  const events: Event[] = [];
  forEachLine(p.child.stdout, (line) => events.push(JSON.parse(line)));
  return { ...p, events };
}

async function until(what: string, ok: () => boolean, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe("nimble provide --json, serving a real training job", () => {
  it("reports its workers' states and stats that match what the run counted for it", async () => {
    const providers = [await providerWithEvents("dash-a"), await providerWithEvents("dash-b")];
    await writeFile(path.join(tmp.dir, "task.py"), tinyTask({ train: 128, val: 32 }));
    const config = path.join(tmp.dir, "nimble.yaml");
    await writeFile(
      config,
      [
        "name: dashboard",
        "task: task.py",
        "steps: 4",
        "batch_size: 32",
        "balance: equal",
        "compression: {method: none}",
        "eval: {samples: 32}",
        `output: ${path.join(tmp.dir, "runs")}`,
        "providers:",
        ...providers.map((p, i) => `  - {address: "${p.address}", token: ${["dash-a", "dash-b"][i]}}`),
      ].join("\n") + "\n",
    );
    const run = await nimble(["train", config, "--json", "--python", python], { timeout: 240_000 });
    expect(run.exitCode, String(run.stderr)).toBe(0);
    const done = String(run.stdout)
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l))
      .find((e) => e.type === "done");
    const summary = JSON.parse(await readFile(path.join(done.run_dir, "summary.json"), "utf8"));
    expect(summary.steps).toBe(4);

    for (const p of providers) {
      await until("the job's end", () => p.events.some((e) => e.type === "job_end"));
      const job = p.events.find((e) => e.type === "job")!;
      expect(job.ranks).toHaveLength(1);
      const rank = job.ranks[0];
      const states = p.events.filter((e) => e.type === "worker" && e.rank === rank).map((e) => e.state);
      expect(states).toEqual(["starting", "ready", "training", "stopped"]);
      const stats = p.events.filter((e) => e.type === "stats");
      expect(stats.length).toBeGreaterThan(0);
      // The last one goes out just before job_end: the job's final figures.
      const last = stats.at(-1)!;
      expect(p.events.indexOf(last)).toBeLessThan(p.events.findIndex((e) => e.type === "job_end"));
      const counted = summary.workers.find((w: { rank: number }) => w.rank === rank);
      expect(counted.samples).toBeGreaterThan(0);
      expect(last.samples).toBe(counted.samples);
      expect(last.ranks).toEqual([expect.objectContaining({ rank, steps: 4, samples: counted.samples })]);
      expect(last.steps).toBe(4);
      expect(last.step).toBe(4);
      for (const bytes of [last.ring.sent, last.ring.received, last.control.sent, last.control.received]) expect(bytes).toBeGreaterThan(0);
      // Coalesced: no more than about two a second.
      const seconds = last.elapsed_s;
      expect(stats.length).toBeLessThanOrEqual(Math.ceil(seconds * 2) + 2);
    }
    // The two ends of the ring agree: what one sent, the other received.
    const [a, b] = providers.map((p) => p.events.filter((e) => e.type === "stats").at(-1)!);
    expect(a.ring.sent).toBe(b.ring.received);
    expect(b.ring.sent).toBe(a.ring.received);
  }, 300_000);
});
