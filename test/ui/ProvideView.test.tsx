import { describe, expect, it } from "vitest";
import type { ProviderEvent } from "../../src/job/provider/index.js";
import { InkProvideReporter, ProvideView } from "../../src/ui/ProvideView.js";
import { initialProvideState, PROVIDE_LOG_LINES, provideTotals, reduceProvide, type ProvideViewState } from "../../src/ui/provideState.js";
import { FakeTty, frameOf, stripAnsi } from "./fixtures.js";
import { jobStart, listening, stats } from "./provideFixtures.js";

const T0 = Date.parse("2025-06-02T12:00:00Z");

/** Events at one-second intervals from T0. */
function stateAfter(events: ProviderEvent[]): ProvideViewState {
  return events.reduce((s, e, i) => reduceProvide(s, e, T0 + i * 1000), initialProvideState());
}

const busy: ProviderEvent[] = [
  listening,
  jobStart,
  { type: "worker", job: "job-7f3a", rank: 1, device: "cuda:0", state: "starting", restarts: 0, pid: 4101 },
  { type: "worker", job: "job-7f3a", rank: 2, device: "cuda:1", state: "starting", restarts: 0, pid: 4102 },
  { type: "worker", job: "job-7f3a", rank: 1, device: "cuda:0", state: "training", restarts: 0, pid: 4101 },
  { type: "worker", job: "job-7f3a", rank: 2, device: "cuda:1", state: "restarting", restarts: 1, pid: 4188 },
  { type: "log", line: "[rank 1] epoch 1", level: "info" },
  { type: "log", line: "worker for rank 2 exited with code 1", level: "warn" },
  stats({ elapsed_s: 59, samples: 3776, ring: { sent: 12_000_000, received: 11_700_000 }, control: { sent: 100_000, received: 120_000 } }),
  stats(),
];

describe("reduceProvide", () => {
  it("tracks the address, job, workers, figures and byte rates", () => {
    const s = stateAfter(busy);
    expect(s.url).toBe("wss://0.0.0.0:7070");
    expect(s.listeningAt).toBe(T0);
    expect(s.profile?.matmul_gflops_fp32).toBe(19_480.4);
    expect(s.job).toEqual({ id: "job-7f3a", name: "mnist-cnn", ranks: [1, 2], worldSize: 4, since: T0 + 1000, from: { fingerprint: "5e0c:91aa:03b2:7d41", address: "10.0.0.9" }, taskSha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" });
    expect(s.workers.map((w) => [w.rank, w.state, w.restarts, w.pid, w.samples])).toEqual([
      [1, "training", 0, 4101, 1920],
      [2, "restarting", 1, 4188, 1920],
    ]);
    // 300 kB more each way over the one second between the two stats events.
    expect(s.rates).toEqual({ sent: 300_000, received: 300_000 });
    expect(provideTotals(s)).toEqual({ jobs: 1, steps: 120, samples: 3840, sent: 12_400_000, received: 12_120_000 });
    expect(s.lines).toEqual(["[rank 1] epoch 1", "warn: worker for rank 2 exited with code 1"]);
  });

  it("keeps the last log lines only, and adds an ended job to the totals", () => {
    const logs: ProviderEvent[] = Array.from({ length: 20 }, (_, i) => ({ type: "log", line: `line ${i}`, level: "info" }));
    const s = stateAfter([...busy, ...logs, { type: "job_end", job: "job-7f3a", reason: "job finished" }]);
    expect(s.lines).toHaveLength(PROVIDE_LOG_LINES);
    expect(s.lines.at(-1)).toBe("line 19");
    expect(s.job).toBeNull();
    expect(s.lastJob).toEqual({ id: "job-7f3a", reason: "job finished" });
    expect(provideTotals(s)).toEqual({ jobs: 1, steps: 120, samples: 3840, sent: 12_400_000, received: 12_120_000 });
    // The next job starts from fresh figures; the totals keep the first.
    const next = reduceProvide(reduceProvide(s, { ...jobStart, job: "job-2" } as ProviderEvent, T0), stats({ job: "job-2", steps: 1, samples: 32 }), T0);
    expect(provideTotals(next).samples).toBe(3872);
    expect(provideTotals(next).jobs).toBe(2);
  });

  it("ignores worker and stats events of a job it is not showing", () => {
    const s = stateAfter([listening, stats(), { type: "worker", job: "other", rank: 0, device: "cpu", state: "ready", restarts: 0, pid: 1 }]);
    expect(s.stats).toBeNull();
    expect(s.workers).toEqual([]);
  });
});

describe("ProvideView", () => {
  it("shows address, token, its key, uptime, devices and profile, the job, worker rows, byte totals and the log", () => {
    const state = stateAfter(busy);
    const now = T0 + 3 * 3600_000 + 125_000;
    const frame = frameOf(<ProvideView state={state} now={now} />);
    if (process.env.SHOW_FRAME) console.log(frame);
    expect(frame).toContain("nimble provide  wss://0.0.0.0:7070  token 3f2a9c0d11e4b7a8  key 829b:3375:1418:d6d2  up 3h02m");
    expect(frame).toContain("cuda:0 (NVIDIA A100-SXM4-80GB)  85.9 GB");
    expect(frame).toContain("19,480 GFLOP/s fp32, 1555 GB/s memory (cuda:0, measured 2025-06-01)");
    expect(frame).toMatch(/job\s+mnist-cnn job-7f3a  ranks 1, 2 of 4  for 3h02m  at step 120/);
    expect(frame).toMatch(/from\s+coordinator 5e0c:91aa:03b2:7d41 at 10\.0\.0\.9  task sha256 9f86d081884c7d65/);
    expect(frame).toMatch(/limits\s+confined \(bwrap\); per worker 8\.0 GB, 512 processes, files up to 17\.2 GB; jobs up to 12 h/);
    expect(frame).toMatch(/rank\s+device\s+state\s+restarts\s+pid\s+steps\s+samples\s+compute\s+comm/);
    expect(frame).toMatch(/^\s*1\s+cuda:0\s+training\s+0\s+4101\s+120\s+1,920\s+12 ms\s+4 ms$/m);
    expect(frame).toMatch(/^\s*2\s+cuda:1\s+restarting\s+1\s+4188\s+120\s+1,920\s+13 ms\s+4 ms$/m);
    expect(frame).toContain("3,840 samples contributed over 120 steps  (1 job)");
    expect(frame).toContain("↑ sent 12.4 MB (300 kB/s)  ↓ received 12.1 MB (300 kB/s)");
    expect(frame).toContain("this job: ring ↑ 12.3 MB ↓ 12.0 MB, control ↑ 100 kB ↓ 120 kB");
    expect(frame).toContain("[rank 1] epoch 1");
    expect(frame).toContain("warn: worker for rank 2 exited with code 1");
  });

  it("says it is waiting for a job, and what became of the last one", () => {
    const state = stateAfter([{ ...listening, profile: null }, jobStart, stats(), { type: "job_end", job: "job-7f3a", reason: "coordinator disconnected" }]);
    const frame = frameOf(<ProvideView state={state} now={T0 + 5000} />);
    expect(frame).toContain("waiting for a job (last: job-7f3a ended: coordinator disconnected)");
    expect(frame).toContain("not measured (--no-profile)");
    expect(frame).not.toContain("restarts");
    expect(frame).toContain("3,840 samples contributed over 120 steps");
  });

  it("renders before the provider listens", () => {
    const frame = frameOf(<ProvideView state={initialProvideState()} now={T0} />);
    expect(frame).toContain("nimble provide  starting…");
    expect(frame).toContain("waiting for a job");
  });
});

describe("InkProvideReporter", () => {
  it("renders events throttled, keeps debug lines out unless verbose, and unmounts on close", async () => {
    const tty = new FakeTty();
    const stream = tty as unknown as NodeJS.WriteStream;
    const r = new InkProvideReporter({ stdout: stream, stderr: stream, throttleMs: 50, patchConsole: false });
    r.handle(listening);
    r.handle(jobStart);
    for (let i = 1; i <= 100; i++) r.handle(stats({ step: i, elapsed_s: i / 10, samples: i * 32 }));
    r.handle({ type: "log", line: "ring link connected", level: "debug" });
    expect(r.viewState.stats?.step).toBe(100);
    expect(r.viewState.lines).toEqual([]);
    await new Promise((res) => setTimeout(res, 120));
    r.close();
    r.close();
    const all = stripAnsi(tty.frames.join(""));
    expect(all).toContain("token 3f2a9c0d11e4b7a8");
    expect(all).toContain("3,200 samples contributed");
    expect(tty.frames.length).toBeLessThan(20);
  });
});
