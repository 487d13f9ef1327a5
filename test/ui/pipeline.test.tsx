import { describe, expect, it } from "vitest";
import type { PipelineStageRow } from "../../src/job/events.js";
import { formatLayers, formatPipelineLine, formatPipelineRows } from "../../src/ui/pipeline.js";
import { PlainReporter } from "../../src/ui/plain.js";
import { TrainView, initialViewState, reduceView } from "../../src/ui/TrainView.js";
import { frameOf, stepEvent } from "./fixtures.js";

function row(rank: number, stage: number, over: Partial<PipelineStageRow> = {}): PipelineStageRow {
  return {
    rank,
    stage,
    layers: stage === 0 ? [0, 4] : [4, 8],
    chains: [rank % 2],
    compute_ms: 12.34,
    send_ms: 1.2,
    recv_ms: 3.4,
    bubble_ms: 5.6,
    peak_saved_bytes: 1_200_000,
    ...over,
  };
}

/** Two stages, two replicas each, given out of order; rank 3 also serves chain 0 (rank 1 was lost). */
const ROWS: PipelineStageRow[] = [row(3, 1, { chains: [0, 1], compute_ms: 2 }), row(0, 0), row(2, 0), row(1, 1)];

describe("formatPipelineRows", () => {
  it("gives one aligned row per stage worker, by stage then rank, with the chains of a rerouted one", () => {
    const lines = formatPipelineRows(ROWS);
    expect(lines).toEqual([
      "stage 0  rank 0  layers 0-3              compute 12.3 ms  send 1.2  recv 3.4  bubble 5.6 ms  saved 1.2 MB",
      "stage 0  rank 2  layers 0-3              compute 12.3 ms  send 1.2  recv 3.4  bubble 5.6 ms  saved 1.2 MB",
      "stage 1  rank 1  layers 4-7              compute 12.3 ms  send 1.2  recv 3.4  bubble 5.6 ms  saved 1.2 MB",
      "stage 1  rank 3  layers 4-7  chains 0,1  compute  2.0 ms  send 1.2  recv 3.4  bubble 5.6 ms  saved 1.2 MB",
    ]);
    // No rerouted worker: no chains column.
    expect(formatPipelineRows([row(1, 1), row(10, 0, { layers: [0, 12] })])).toEqual([
      "stage 0  rank 10  layers 0-11  compute 12.3 ms  send 1.2  recv 3.4  bubble 5.6 ms  saved 1.2 MB",
      "stage 1  rank  1  layers  4-7  compute 12.3 ms  send 1.2  recv 3.4  bubble 5.6 ms  saved 1.2 MB",
    ]);
  });

  it("names layers the task splits itself, single layers, and survives non-numbers", () => {
    expect(formatLayers(null)).toBe("build_stages");
    expect(formatLayers([5, 6])).toBe("5");
    expect(formatLayers([0, 12])).toBe("0-11");
    const [line] = formatPipelineRows([row(0, 0, { layers: null, compute_ms: NaN, peak_saved_bytes: Infinity })]);
    expect(line).toBe("stage 0  rank 0  layers build_stages  compute - ms  send 1.2  recv 3.4  bubble 5.6 ms  saved -");
  });

  it("shows each worker's resident memory when the workers report it", () => {
    const rows = [row(0, 0, { rss_bytes: 310e6 }), row(1, 1, { rss_bytes: null })];
    const lines = formatPipelineRows(rows);
    expect(lines[0]).toMatch(/mem 310(\.0)? MB$/);
    expect(lines[1]).toMatch(/mem -$/);
    expect(formatPipelineRows([row(0, 0)])[0]).not.toMatch(/mem/);
  });

  it("bounds the rows and counts the rest", () => {
    const many = Array.from({ length: 40 }, (_, r) => row(r, r % 4));
    const lines = formatPipelineRows(many, 16);
    expect(lines).toHaveLength(17);
    expect(lines[16]).toBe("… 24 more stage workers");
    expect(formatPipelineRows([])).toEqual([]);
  });
});

describe("formatPipelineLine", () => {
  it("is one compact line, by stage then rank", () => {
    expect(formatPipelineLine([row(1, 1), row(0, 0)])).toBe("pipeline: s0 r0 c12.3/s1.2/r3.4/b5.6 ms | s1 r1 c12.3/s1.2/r3.4/b5.6 ms");
    expect(formatPipelineLine([row(3, 1, { chains: [0, 1] })])).toBe("pipeline: s1 r3 c12.3/s1.2/r3.4/b5.6 ms (chains 0,1)");
    expect(formatPipelineLine([])).toBe("");
    const many = Array.from({ length: 20 }, (_, r) => row(r, r % 2));
    expect(formatPipelineLine(many, 16)).toMatch(/ \| \+4 more$/);
  });
});

describe("pipeline in the live view", () => {
  it("shows one row per stage worker under the rates", () => {
    const state = [stepEvent(10, 100, { pipeline: ROWS })].reduce(reduceView, initialViewState());
    expect(state.pipeline).toHaveLength(4);
    const frame = frameOf(<TrainView state={state} />);
    const rows = frame.split("\n").filter((l) => l.startsWith("stage "));
    expect(rows).toHaveLength(4);
    expect(rows[3]).toContain("stage 1  rank 3  layers 4-7");
    expect(rows[3]).toContain("chains 0,1");
    // A step without figures keeps the last ones; a run without a pipeline shows none.
    const later = reduceView(state, stepEvent(11, 100));
    expect(later.pipeline).toBe(state.pipeline);
    expect(frameOf(<TrainView state={reduceView(initialViewState(), stepEvent(1))} />)).not.toContain("stage ");
  });

  it("prints the plain line with each step line it prints, throttled like them", () => {
    const chunks: string[] = [];
    let t = 0;
    const r = new PlainReporter({ out: { write: (s: string) => chunks.push(s) }, now: () => t });
    r.handle(stepEvent(1, 100, { workers: [], pipeline: ROWS }));
    t = 100;
    r.handle(stepEvent(2, 100, { workers: [], pipeline: ROWS })); // within 2 s: not printed
    t = 2500;
    r.handle(stepEvent(3, 100, { workers: [], pipeline: ROWS }));
    r.handle(stepEvent(4, 100, { workers: [] })); // no pipeline figures: no pipeline line
    r.close();
    const lines = chunks.join("").split("\n").slice(0, -1);
    expect(lines.filter((l) => l.startsWith("step "))).toHaveLength(3);
    const pipe = lines.filter((l) => l.startsWith("pipeline: "));
    expect(pipe).toHaveLength(2);
    expect(pipe[0]).toBe(
      "pipeline: s0 r0 c12.3/s1.2/r3.4/b5.6 ms | s0 r2 c12.3/s1.2/r3.4/b5.6 ms | s1 r1 c12.3/s1.2/r3.4/b5.6 ms | s1 r3 c2.0/s1.2/r3.4/b5.6 ms (chains 0,1)",
    );
    expect(lines[lines.indexOf(pipe[0]!) - 1]).toMatch(/^step +1\/100/);
  });
});
