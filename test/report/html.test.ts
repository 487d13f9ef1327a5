import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, describe, expect, it, vi } from "vitest";
import { reportCommand } from "../../src/commands/report.js";
import type { TrainSummary } from "../../src/job/coordinator/index.js";
import type { StepMetrics } from "../../src/job/runDir.js";
import { buildReport, reportData } from "../../src/report/html.js";
import { escapeXml, niceTicks, renderChart, stack } from "../../src/report/svg.js";
import type { RunData } from "../../src/runs/runData.js";
import { tempDir } from "../helpers/processes.js";

/** Synthetic metrics: `steps` steps of 3 workers, eval every 5, compression from step 3. */
function metrics(steps: number): StepMetrics[] {
  return Array.from({ length: steps }, (_, step) => {
    const shares = [20 + (step % 3), 22, 22 - (step % 3)];
    return {
      step,
      loss: step === 4 ? null : 2 / (step + 1),
      lr: 0.01,
      samples: 64,
      wall_s: 1 + step * 0.5,
      step_s: 0.5,
      bytes_sent: step < 3 ? 900_000 : 80_000,
      uncompressed_bytes: 900_000,
      ...(step === 4 ? { skipped: true } : {}),
      ...(step % 5 === 4 ? { eval: { loss: 1 / (step + 1), accuracy: 0.5 + step / 40 }, eval_s: 0.1 } : {}),
      workers: shares.map((share, rank) => ({
        rank,
        samples: share,
        share,
        compute_s: 0.2,
        forward_backward_s: 0.15,
        comm_s: 0.1,
        idle_s: 0.05,
        bytes_sent: 300_000,
        uncompressed_bytes: 300_000,
        micro_batches: 1,
        max_micro_batch: null,
      })),
    };
  });
}

function summary(overrides: Partial<TrainSummary> = {}): TrainSummary {
  return {
    name: "tiny",
    status: "completed",
    steps: 10,
    samples: 640,
    wall_s: 5.5,
    final_loss: 0.2,
    eval: { loss: 0.1, accuracy: 0.725 },
    eval_step: 9,
    bytes_sent: 3_400_000,
    sync_bytes: 900_000,
    uncompressed_bytes: 9_000_000,
    compression_ratio: 3.6,
    compression: { method: "powersgd", rank: 4, start_step: 3 } as TrainSummary["compression"],
    steps_skipped: [4],
    left_out: [{ rank: 2, id: "host-c#0", after_step: 6, reason: "too slow" }],
    faults: [
      { step: 3, wall_s: 2.4, kind: "worker died", ranks: [1], reason: "worker for rank 1 was killed by SIGKILL", recovery_s: 1.5 },
      // An older summary without wall_s: the report places it at its step's time.
      { step: 7, kind: "ring broken", ranks: [], reason: "ring link 0 -> 1 closed", recovery_s: null } as unknown as TrainSummary["faults"][number],
    ],
    steps_redone: [3, 7],
    links: [{ rank: 0, to: 1, rtt_ms: 1.2, upload_bytes_per_s: 5e7 }],
    workers: [
      { id: "host-a#0", rank: 0, provider: "ws://host-a:7070", device: "cuda:0", samples: 220, share: 0.34 },
      { id: "host-b#0", rank: 1, provider: "ws://host-b:7070", device: "cpu", samples: 220, share: 0.34 },
      { id: "host-c#0", rank: 2, provider: "ws://host-c:7070", device: "cpu", samples: 200, share: 0.32 },
    ],
    run_dir: "/runs/tiny-1",
    started_at: "2026-11-26T09:00:00.000Z",
    ...overrides,
  };
}

function run(overrides: Partial<RunData> = {}): RunData {
  return {
    dir: "/runs/tiny-1",
    name: "tiny",
    status: "completed",
    summary: summary(),
    metrics: metrics(10),
    checkpoints: [5, 10],
    startedAt: new Date("2026-11-26T09:00:00Z"),
    updatedAt: new Date("2026-11-26T09:01:00Z"),
    logFile: null,
    ...overrides,
  };
}

const CHARTS = ["loss-by-step", "loss-by-time", "throughput", "shares", "bytes"];

/** Every data-chart id in the HTML, with the number of fault markers in that chart. */
function chartsIn(html: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const svg of html.split("<svg ").slice(1)) {
    const id = /data-chart="([^"]+)"/.exec(svg)![1]!;
    out.set(id, (svg.split("</svg>")[0]!.match(/class="fault-marker"/g) ?? []).length);
  }
  return out;
}

describe("svg primitives", () => {
  it("picks round ticks that cover the range", () => {
    expect(niceTicks(0, 2.31).values).toEqual([0, 0.5, 1, 1.5, 2, 2.5]);
    expect(niceTicks(0.77, 0.93).values).toEqual([0.75, 0.8, 0.85, 0.9, 0.95]);
    expect(niceTicks(0, 7, 10, true).values).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    // A single value still gives an axis with width.
    const one = niceTicks(5, 5);
    expect(one.max).toBeGreaterThan(one.min);
    expect(niceTicks(NaN, Infinity).values).toEqual([0, 0.2, 0.4, 0.6, 0.8, 1]);
  });

  it("stacks layers into bands, a missing x counting 0", () => {
    const bands = stack([
      { name: "a", points: [{ x: 0, y: 0.5 }, { x: 1, y: 0.4 }] },
      { name: "b", points: [{ x: 0, y: 0.5 }] },
    ]);
    expect(bands[1]!.points).toEqual([
      { x: 0, y0: 0.5, y: 1 },
      { x: 1, y0: 0.4, y: 0.4 },
    ]);
  });

  it("draws empty, single-point and non-finite data without NaN in any attribute", () => {
    for (const points of [[], [{ x: 3, y: 1 }], [{ x: 0, y: NaN }, { x: 1, y: Infinity }]]) {
      const svg = renderChart({
        id: "c",
        title: "t",
        xLabel: "step",
        yLabel: "y",
        series: [
          { name: "line", kind: "line", points },
          { name: "bars", kind: "bars", points },
          { name: "dots", kind: "points", axis: "right", points },
        ],
        markers: [{ x: 3, label: "F1", title: "fault", kind: "fault-marker" }],
      });
      expect(svg).not.toMatch(/NaN|Infinity|undefined/);
      expect(svg).toContain('data-chart="c"');
      if (points.length !== 1) expect(svg).toContain("No data");
    }
  });

  it("escapes text", () => {
    expect(escapeXml(`<a href="x">'&'</a>`)).toBe("&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
  });
});

describe("buildReport", () => {
  it("shows the summary, workers, faults and every chart, with each fault marked on every chart", () => {
    const html = buildReport(run());
    expect(html.startsWith("<!doctype html>")).toBe(true);
    const charts = chartsIn(html);
    expect([...charts.keys()]).toEqual(CHARTS);
    for (const id of CHARTS) expect(charts.get(id), id).toBe(2);
    expect(html).toContain("<th scope=\"row\">Steps</th><td>10</td>");
    expect(html).toContain("<th scope=\"row\">Final loss</th><td>0.2000</td>");
    expect(html).toContain("loss 0.1000, accuracy 0.7250 (step 9)");
    expect(html).toContain("3.6x, powersgd (rank 4, start step 3)");
    expect(html).toContain("host-b#0");
    expect(html).toContain("ring link 0 -&gt; 1 closed");
    expect(html).toMatch(/class="leftout-marker"/);
    // Accuracy is not squashed onto the loss axis.
    expect(html).toContain("validation accuracy (right axis)");
    expect(html).not.toMatch(/NaN|undefined/);
  });

  it("places a fault without wall_s at its step's time", () => {
    const data = reportData(run());
    expect(data.faults.map((f) => f.wall_s)).toEqual([2.4, 1 + 7 * 0.5]);
  });

  it("loads nothing: no URL of any kind, and a CSP that forbids loading", () => {
    const html = buildReport(run());
    expect(html).not.toMatch(/https?:\/\//);
    expect(html).not.toMatch(/<(script|link|img|iframe)\b/i);
    expect(html).not.toMatch(/url\(/);
    expect(html).toContain("default-src 'none'");
  });

  it("escapes a worker's rank from summary.json, which is a file anyone may have edited", () => {
    const evil = '<meta http-equiv="refresh" content="0;url=http://127.0.0.1:9/">';
    const workers = [{ id: "w", rank: evil as unknown as number, provider: "p", device: "cpu", samples: 1, share: 1 }];
    const html = buildReport(run({ summary: summary({ workers }) }));
    expect(html).not.toContain("<meta http-equiv=\"refresh\"");
    expect(html).toContain("&lt;meta http-equiv=&quot;refresh&quot;");
  });

  it("escapes names and reasons that come from the config and the network", () => {
    const evil = `<script>alert("x")</script>`;
    const s = summary({
      name: evil,
      workers: summary().workers.map((w) => ({ ...w, id: `${evil}#${w.rank}`, device: evil })),
      faults: [{ step: 3, wall_s: 2, kind: "provider lost", ranks: [2], reason: evil, recovery_s: 1 }],
    });
    const html = buildReport(run({ name: evil, summary: s }));
    expect(html).not.toContain("<script");
    expect(html).toContain("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;");
  });

  it("reports a killed run (no summary.json) from its metrics", () => {
    const killed = run({ summary: null, status: "incomplete", metrics: metrics(7) });
    const data = reportData(killed);
    expect(data.figures).toMatchObject({ steps: 7, samples: 7 * 64, workers: 3, faults: 0, steps_skipped: [4], steps_redone: null });
    expect(data.workers.map((w) => [w.rank, w.id])).toEqual([
      [0, null],
      [1, null],
      [2, null],
    ]);
    const html = buildReport(killed);
    expect(html).toContain("incomplete (no summary.json");
    expect(html).toContain("rank 1");
    expect([...chartsIn(html).values()]).toEqual([0, 0, 0, 0, 0]);
    expect(html).not.toMatch(/NaN|undefined/);
  });

  it("reports a run with no metrics at all", () => {
    const html = buildReport(run({ summary: null, status: "incomplete", metrics: [], checkpoints: [] }));
    expect([...chartsIn(html).keys()]).toEqual(CHARTS);
    expect(html.match(/No data/g)).toHaveLength(CHARTS.length);
    expect(html).not.toMatch(/NaN|undefined|Infinity/);
  });

  it("draws a single step", () => {
    const html = buildReport(run({ summary: null, status: "incomplete", metrics: metrics(1) }));
    expect(html).not.toMatch(/NaN|undefined|Infinity/);
    expect(html).not.toContain("No data");
  });
});

describe("reportCommand", () => {
  const dirs: Array<() => Promise<void>> = [];
  afterAll(() => Promise.all(dirs.map((remove) => remove())));

  it("writes report.html into the run directory and prints the path, or JSON with the data", async () => {
    const tmp = await tempDir("nimble-report-");
    dirs.push(tmp.remove);
    const dir = path.join(tmp.dir, "runs", "tiny-20261126-090000");
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, "summary.json"), JSON.stringify(summary({ run_dir: dir })));
    await writeFile(path.join(dir, "metrics.jsonl"), metrics(10).map((m) => JSON.stringify(m) + "\n").join(""));
    const out: string[] = [];
    const write = vi.spyOn(process.stdout, "write").mockImplementation((chunk) => (out.push(String(chunk)), true));
    try {
      await reportCommand("tiny-2026", { output: path.join(tmp.dir, "runs") });
      expect(out.join("")).toBe(`${path.join(dir, "report.html")}\n`);
      expect(await readFile(path.join(dir, "report.html"), "utf8")).toContain('data-chart="shares"');
      out.length = 0;
      const custom = path.join(tmp.dir, "elsewhere", "r.html");
      await reportCommand(dir, { out: custom, json: true });
      const printed = JSON.parse(out.join(""));
      expect(printed.report).toBe(custom);
      expect(printed.data.figures.steps).toBe(10);
      expect(printed.data.series.shares).toHaveLength(3);
    } finally {
      write.mockRestore();
    }
  });

  it("names a run that does not exist", async () => {
    await expect(reportCommand("no-such-run", { output: "/nonexistent-runs" })).rejects.toThrow(/No run no-such-run/);
  });
});
