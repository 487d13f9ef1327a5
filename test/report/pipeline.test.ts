import { describe, expect, it } from "vitest";
import type { PipelineSummary, TrainSummary } from "../../src/job/coordinator/tally.js";
import { buildReport, reportData } from "../../src/report/html.js";
import { MAX_DRAWN_EVENTS, pipelineReport, pipelineSection } from "../../src/report/pipeline.js";
import type { RunData } from "../../src/runs/runData.js";

type Ev = [string, number, number, number, number];

/** GPipe over 2 stages, 4 micro-batches of 10 ms forward, 20 ms backward; stage 1 starts after stage 0's first forward. */
function gpipe(): PipelineSummary["timeline"] {
  const s0: Ev[] = [];
  const s1: Ev[] = [];
  for (let m = 0; m < 4; m++) s0.push(["F", 0, m, m * 0.01, (m + 1) * 0.01]);
  for (let m = 0; m < 4; m++) s1.push(["F", 0, m, (m + 1) * 0.01, (m + 2) * 0.01]);
  for (let m = 0; m < 4; m++) s1.push(["B", 0, m, 0.05 + m * 0.02, 0.07 + m * 0.02]);
  for (let m = 0; m < 4; m++) s0.push(["B", 0, m, 0.07 + m * 0.02, 0.09 + m * 0.02]);
  return {
    step: 7,
    workers: [
      { rank: 1, stage: 1, events: s1 },
      { rank: 0, stage: 0, events: s0 },
    ],
  };
}

function pipelineSummary(over: Partial<PipelineSummary> = {}): PipelineSummary {
  return {
    config: { pipeline_stages: 2, micro_batches: 4, schedule: "gpipe", activation_codec: "none" } as PipelineSummary["config"],
    plan: {
      stages: [
        { index: 0, layers: [0, 3], names: ["conv1", "pool"], ranks: [0], params: 12_345, memoryBytes: 2e8, capBytes: 8e8, computeS: 0.004 },
        { index: 1, layers: [3, 6], names: ["fc1", "fc2"], ranks: [1], params: 67_890, memoryBytes: 3e8, capBytes: null, computeS: 0.006 },
      ],
      chains: [[0, 1]],
      bounds: [0, 3, 6],
      why: [],
      objective: "memory",
      model: "Net",
      micro_batch: 16,
      sequential: true,
    },
    why: ["stage 0 holds conv1 … pool: the largest activations", "<b>not bold</b>"],
    stages: [],
    timeline: gpipe(),
    peak_saved_bytes: [4_000_000, 1_500_000],
    ...over,
  };
}

function run(pipeline: unknown): RunData {
  const summary = {
    name: "pipe",
    status: "completed",
    steps: 8,
    samples: 512,
    wall_s: 3,
    final_loss: 0.5,
    eval: null,
    eval_step: null,
    bytes_sent: 1000,
    sync_bytes: 0,
    uncompressed_bytes: 1000,
    compression_ratio: 1,
    compression: { method: "none" },
    strategy: { name: "allreduce" },
    steps_skipped: [],
    left_out: [],
    faults: [],
    steps_redone: [],
    links: [],
    workers: [
      { id: "a#0", rank: 0, provider: "a", device: "cpu", samples: 256, share: 0.5 },
      { id: "b#0", rank: 1, provider: "b", device: "cpu", samples: 256, share: 0.5 },
    ],
    started_at: "2026-11-26T09:00:00.000Z",
    pipeline,
  } as unknown as TrainSummary;
  return {
    dir: "/runs/pipe-1",
    name: "pipe",
    status: "completed",
    summary,
    metrics: [],
    checkpoints: [],
    startedAt: new Date("2026-11-26T09:00:00Z"),
    updatedAt: new Date("2026-11-26T09:01:00Z"),
    logFile: null,
  };
}

function timelineSvg(html: string): string {
  const at = html.indexOf('<svg data-chart="pipeline-timeline"');
  expect(at).toBeGreaterThanOrEqual(0);
  return html.slice(at, html.indexOf("</svg>", at));
}

describe("pipeline report", () => {
  it("draws the plan, the why lines and a 2-stage timeline with a lane per worker and a rect per event", () => {
    const html = buildReport(run(pipelineSummary()));
    expect(html).toContain("<h2>Pipeline</h2>");
    expect(html).toContain("2 stages × 1 replica, 4 micro-batches, schedule gpipe");
    // Plan: layers, first/last names, ranks, params, memory vs cap.
    expect(html).toContain("<td>0-2</td><td>conv1 … pool</td><td>0</td><td>12,345</td><td>200 MB / 800 MB (25%)</td>");
    expect(html).toContain("<td>3-5</td><td>fc1 … fc2</td><td>1</td><td>67,890</td><td>300 MB (no limit known)</td>");
    expect(html).toContain("<li>stage 0 holds conv1 … pool: the largest activations</li>");
    expect(html).toContain("<li>&lt;b&gt;not bold&lt;/b&gt;</li>");

    const svg = timelineSvg(html);
    const lanes = [...svg.matchAll(/<g class="lane" data-stage="(\d+)" data-rank="(\d+)">/g)].map((m) => `${m[1]}/${m[2]}`);
    expect(lanes).toEqual(["0/0", "1/1"]); // sorted by stage
    expect(svg).toContain("stage 0 · rank 0");
    expect(svg).toContain("stage 1 · rank 1");
    expect(svg.match(/class="ev ev-F"/g)).toHaveLength(8);
    expect(svg.match(/class="ev ev-B"/g)).toHaveLength(8);
    expect(svg).toContain("forward micro-batch 2, chain 0");
    expect(svg).toMatch(/font-size="10" fill="#fff">3<\/text>/); // micro-batch number inside a wide rect
    expect(svg).toContain("(ms)");
    expect(html).not.toMatch(/NaN|undefined|Infinity/);

    // Bubble: span 0..0.15 s; stage 0 busy 0.04 + 0.08, stage 1 the same: 1 - 0.12 / 0.15 = 20%.
    const data = reportData(run(pipelineSummary()));
    expect(data.pipeline!.bubble.map((b) => [b.stage, b.workers, Number(b.measured!.toFixed(6))])).toEqual([
      [0, 1, 0.2],
      [1, 1, 0.2],
    ]);
    expect(data.pipeline!.theory_bubble).toBeCloseTo(1 / 5);
    expect(html).toContain("<td>20.0%</td><td>20.0% ((2 − 1) / (4 + 2 − 1))</td>");
    // Peak saved activations per stage.
    expect(html).toContain("<td>0</td><td>4.0 MB</td>");
    expect(html).toContain("<td>1</td><td>1.5 MB</td>");
  });

  it("has no section without a pipeline, and says so when no step was timed", () => {
    expect(buildReport(run(undefined))).not.toContain("<h2>Pipeline</h2>");
    expect(reportData(run(undefined)).pipeline).toBeNull();
    const html = buildReport(run(pipelineSummary({ timeline: null })));
    expect(html).toContain("No step's timeline was recorded.");
    expect(html).not.toContain('data-chart="pipeline-timeline"');
  });

  it("shows a resumed layout's bounds", () => {
    const html = buildReport(run(pipelineSummary({ plan: { resumed: true, bounds: [0, 4, 8], chains: [[0, 1]] }, why: ["the layout of the checkpoint resumed"] })));
    expect(html).toContain("Layers split at 0 | 4 | 8.");
    expect(html).toContain("the layout of the checkpoint resumed");
  });

  it("does not throw on a malformed section, escapes its text and leaves out what is not a number", () => {
    const evil = `<script>alert(1)</script>`;
    const bad: unknown[] = [
      null,
      42,
      "pipeline",
      [],
      { config: evil, plan: evil, why: evil, timeline: evil, peak_saved_bytes: evil },
      { config: { pipeline_stages: "2", micro_batches: -1, schedule: { x: 1 } }, plan: { stages: [null, 3, { index: "0" }, { index: 0, layers: [NaN, 2], names: [1, 2] }] }, why: [1, null, evil] },
      {
        config: { pipeline_stages: 2, micro_batches: 4, schedule: evil },
        plan: { stages: [{ index: 0, layers: [0, 2], names: [evil, evil], ranks: [evil, 0], params: Infinity, memoryBytes: "x", capBytes: -1 }], chains: [[0, evil]], model: evil },
        why: [evil],
        timeline: {
          step: evil,
          workers: [
            null,
            { rank: evil, stage: 0, events: [] },
            { rank: 0, stage: 0, events: [["X", 0, 0, 0, 1], ["F", 0, 0, "0", 1], ["F", 0, 0, 0.5, 0.1], ["F", -1, 0, 0, 1], "F", null, ["F", 0, 0, 0, 0.01]] },
            { rank: 1, stage: 1, events: evil },
          ],
        },
        peak_saved_bytes: [NaN, "1", 5],
      },
    ];
    for (const p of bad) {
      const html = buildReport(run(p));
      expect(html).not.toContain("<script");
      expect(html).not.toMatch(/NaN|undefined|Infinity/);
    }
    const html = buildReport(run(bad.at(-1)));
    expect(html).toContain("&lt;script&gt;");
    const svg = timelineSvg(html);
    expect(svg.match(/class="lane"/g)).toHaveLength(2);
    expect(svg.match(/class="ev ev-F"/g)).toHaveLength(1);
    expect(html).toContain("malformed entries left out");
    expect(reportData(run(bad.at(-1))).pipeline!.peak_saved_bytes).toEqual([{ stage: 2, bytes: 5 }]);
  });

  it("bounds the events drawn", () => {
    const events: Ev[] = Array.from({ length: 30_000 }, (_, i) => [i % 2 ? "B" : "F", 0, i, i * 1e-4, i * 1e-4 + 5e-5]);
    const p = pipelineReport(pipelineSummary({ timeline: { step: 0, workers: [{ rank: 0, stage: 0, events }, { rank: 1, stage: 1, events: events.slice(0, 10) }] } }))!;
    expect(p.timeline!.events).toBe(30_010);
    expect(p.timeline!.drawn).toBeLessThanOrEqual(MAX_DRAWN_EVENTS);
    const section = pipelineSection(p);
    expect(section.match(/class="ev ev-/g)!.length).toBe(p.timeline!.drawn);
    expect(section).toMatch(/[\d,]+ of 30,010 events drawn/);
    // The bubble is measured over every event, drawn or not: 50% busy on rank 0.
    expect(p.bubble[0]!.measured).toBeCloseTo(0.5, 3);
  });
});
