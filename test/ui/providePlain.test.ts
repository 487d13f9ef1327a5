import { describe, expect, it } from "vitest";
import type { ProviderEvent } from "../../src/job/provider/index.js";
import { ProvideJsonReporter, ProvidePlainReporter } from "../../src/ui/providePlain.js";
import type { Verbosity } from "../../src/ui/plain.js";
import { reporterKind } from "../../src/ui/reporter.js";
import { jobStart, listening, stats } from "./provideFixtures.js";

/** A job's life, each event at `at` seconds. */
const timeline: Array<[number, ProviderEvent]> = [
  [0, listening],
  [0, { type: "log", line: "coordinator 10.0.0.5:51234 connected", level: "debug" }],
  [1, jobStart],
  [1, { type: "worker", job: "job-7f3a", rank: 1, device: "cuda:0", state: "starting", restarts: 0, pid: 4101 }],
  [2, { type: "log", line: "[rank 1] loading MNIST", level: "info" }],
  [3, { type: "worker", job: "job-7f3a", rank: 1, device: "cuda:0", state: "training", restarts: 0, pid: 4101 }],
  [4, stats({ step: 10, samples: 320, ring: { sent: 1_000_000, received: 900_000 }, control: { sent: 0, received: 0 } })],
  [8, stats({ step: 40, samples: 1280 })],
  [12, stats({ step: 60, samples: 1920 })],
  [13, { type: "log", line: "worker for rank 1 exited with code 1", level: "warn" }],
  [13, { type: "worker", job: "job-7f3a", rank: 1, device: "cuda:0", state: "restarting", restarts: 1, pid: 4188 }],
  [15, stats()],
  [16, { type: "job_end", job: "job-7f3a", reason: "job finished" }],
];

function printed(verbosity: Verbosity): string[] {
  let clock = 0;
  const out: string[] = [];
  const r = new ProvidePlainReporter({ out: { write: (s: string) => out.push(s) }, verbosity, now: () => clock * 1000, statsIntervalMs: 10_000 });
  for (const [at, event] of timeline) {
    clock = at;
    r.handle(event);
  }
  r.close();
  r.handle({ type: "log", line: "after close", level: "error" });
  return out.join("").trimEnd().split("\n");
}

const listeningBlock = [
  "nimble provider listening on wss://0.0.0.0:7070",
  "  key:     ed25519:yjP1F8x4GVlsVq9W614XG5oohUmayfKgQsGreja7iQ8 (829b:3375:1418:d6d2)",
  "  token:   3f2a9c0d11e4b7a8",
  "  device:  cuda:0 (NVIDIA A100-SXM4-80GB)",
  "  limits:  confined (bwrap); per worker 8.0 GB, 512 processes, files up to 17.2 GB; jobs up to 12 h",
  "  profile: 19,480 GFLOP/s fp32, 1555 GB/s memory (cuda:0, measured 2025-06-01)",
  "Give the address and token to the researcher (config `providers:`, with `key:` to check this host too). Ctrl-C stops.",
];
const jobEnd = "job job-7f3a ended: job finished (120 steps, 3,840 samples, sent 12.4 MB, received 12.1 MB)";

describe("ProvidePlainReporter", () => {
  it("prints the listening block, jobs, worker changes, log lines, and a stats line at most every 10 s", () => {
    expect(printed("normal")).toEqual([
      ...listeningBlock,
      "job job-7f3a (mnist-cnn): ranks 1, 2 of 4, from 5e0c:91aa:03b2:7d41 at 10.0.0.9, task sha256 9f86d081884c7d65",
      "rank 1 (cuda:0): starting",
      "[rank 1] loading MNIST",
      "rank 1 (cuda:0): training",
      // 4 s and 8 s after the job started: too soon; 12 s: 11 s after it started.
      "job job-7f3a: step 60, 1,920 samples, sent 12.4 MB, received 12.1 MB",
      "warn: worker for rank 1 exited with code 1",
      "rank 1 (cuda:0): restarting (restart 1)",
      jobEnd,
    ]);
  });

  it("--quiet: only the listening block, jobs starting and ending, warnings and errors", () => {
    expect(printed("quiet")).toEqual([...listeningBlock, "job job-7f3a (mnist-cnn): ranks 1, 2 of 4, from 5e0c:91aa:03b2:7d41 at 10.0.0.9, task sha256 9f86d081884c7d65", "warn: worker for rank 1 exited with code 1", jobEnd]);
  });

  it("--verbose: also every stats event and debug lines", () => {
    const lines = printed("verbose");
    expect(lines).toContain("coordinator 10.0.0.5:51234 connected");
    expect(lines.filter((l) => l.startsWith("job job-7f3a: step"))).toEqual([
      "job job-7f3a: step 10, 320 samples, sent 1.0 MB, received 900 kB",
      "job job-7f3a: step 40, 1,280 samples, sent 12.4 MB, received 12.1 MB",
      "job job-7f3a: step 60, 1,920 samples, sent 12.4 MB, received 12.1 MB",
      "job job-7f3a: step 120, 3,840 samples, sent 12.4 MB, received 12.1 MB",
    ]);
  });

  it("leaves the profile line out without a profile, and the totals out of a job that never reported", () => {
    const out: string[] = [];
    const r = new ProvidePlainReporter({ out: { write: (s: string) => out.push(s) } });
    r.handle({ ...listening, profile: null });
    r.handle({ type: "job_end", job: "job-x", reason: "coordinator disconnected" });
    expect(out.join("")).not.toContain("profile:");
    expect(out.at(-1)).toBe("job job-x ended: coordinator disconnected\n");
  });
});

describe("ProvideJsonReporter", () => {
  it("writes every event as one JSON object per line", () => {
    const out: string[] = [];
    const r = new ProvideJsonReporter({ write: (s: string) => out.push(s) });
    for (const [, e] of timeline) r.handle(e);
    expect(out).toHaveLength(timeline.length);
    expect(out.map((l) => JSON.parse(l))).toEqual(timeline.map(([, e]) => e));
  });
});

describe("reporterKind", () => {
  const tty = { isTTY: true } as NodeJS.WriteStream;
  const pipe = { isTTY: false } as NodeJS.WriteStream;
  it("shows the dashboard only on a terminal outside CI, without --json or --quiet", () => {
    expect(reporterKind({ json: false, verbosity: "normal", stream: tty, env: {} })).toBe("ink");
    expect(reporterKind({ json: false, verbosity: "verbose", stream: tty, env: {} })).toBe("ink");
    expect(reporterKind({ json: false, verbosity: "normal", stream: tty, env: { CI: "true" } })).toBe("plain");
    expect(reporterKind({ json: false, verbosity: "normal", stream: pipe, env: {} })).toBe("plain");
    expect(reporterKind({ json: false, verbosity: "quiet", stream: tty, env: {} })).toBe("plain");
    expect(reporterKind({ json: true, verbosity: "normal", stream: tty, env: {} })).toBe("json");
  });
});
