import { describe, expect, it } from "vitest";
import { parallelSchema } from "../../src/config/schema.js";
import { mergeSafetensors, parseSafetensors, encodeSafetensors } from "../../src/runs/safetensors.js";
import { PipelineStrategy, pipelineGroups, routeChains, StageLostError, type PipelineLayout } from "../../src/strategy/pipeline.js";
import type { RoundReport } from "../../src/strategy/types.js";

// 2 stages x 2 chains: chain 0 = ranks 0 -> 1, chain 1 = ranks 2 -> 3.
const grid: PipelineLayout = { stages: 2, stageOf: [0, 1, 0, 1], chains: [[0, 1], [2, 3]] };

describe("routeChains", () => {
  it("keeps every chain on its own holders while they are members", () => {
    expect(routeChains(grid, [0, 1, 2, 3])).toEqual([[0, 1], [2, 3]]);
  });

  it("reroutes a lost holder's micro-batches through another replica of its stage", () => {
    expect(routeChains(grid, [0, 2, 3])).toEqual([[0, 3], [2, 3]]);
    expect(routeChains(grid, [1, 2, 3])).toEqual([[2, 1], [2, 3]]);
  });

  it("spreads rerouted chains over the least loaded replicas", () => {
    const three: PipelineLayout = { stages: 2, stageOf: [0, 1, 0, 1, 0, 1], chains: [[0, 1], [2, 3], [4, 5]] };
    const routes = routeChains(three, [0, 2, 3, 4, 5]);
    expect(routes[0][1]).toBe(3); // ranks 3 and 5 each serve one chain: the lower rank takes it
    expect(routes.slice(1)).toEqual([[2, 3], [4, 5]]);
  });

  it("throws StageLostError when a stage has no member left", () => {
    expect(() => routeChains({ stages: 2, stageOf: [0, 1], chains: [[0, 1]] }, [0])).toThrow(StageLostError);
  });
});

describe("pipelineGroups", () => {
  it("names a ring per replicated stage and a pipe per consecutive pair", () => {
    expect(pipelineGroups(grid, [0, 1, 2, 3], routeChains(grid, [0, 1, 2, 3]))).toEqual([
      { id: "stage:0", kind: "ring", members: [0, 2] },
      { id: "stage:1", kind: "ring", members: [1, 3] },
      { id: "pipe:0:1", kind: "pipe", members: [0, 1] },
      { id: "pipe:2:3", kind: "pipe", members: [2, 3] },
    ]);
  });

  it("re-forms without the lost: a lone stage needs no ring, the rerouted chain a new pipe", () => {
    const members = [0, 2, 3];
    expect(pipelineGroups(grid, members, routeChains(grid, members))).toEqual([
      { id: "stage:0", kind: "ring", members: [0, 2] },
      { id: "pipe:0:3", kind: "pipe", members: [0, 3] },
      { id: "pipe:2:3", kind: "pipe", members: [2, 3] },
    ]);
  });
});

function report(rank: number, stage: number, extra: Partial<RoundReport> = {}): RoundReport {
  return {
    rank,
    step: 0,
    loss: 2.5,
    samples: 8,
    lr: 0.1,
    compute_s: 0.2,
    comm_s: 0.01,
    skipped: false,
    micro_batches: 4,
    max_micro_batch: null,
    dense_count: 100,
    bytes_sent: 1000,
    pipeline: { stage, chains: [rank >> 1], compute_s: 0.2, send_s: 0.01, recv_s: 0.05, bubble_s: 0.04, peak_saved_bytes: 4096, act_bytes_sent: 800, timeline: [["F", 0, 0, 10, 10.1]] },
    ...extra,
  } as RoundReport;
}

describe("PipelineStrategy", () => {
  const parallel = parallelSchema.parse({ pipeline_stages: 2, micro_batches: 4 });
  const strategy = () => new PipelineStrategy([0, 1, 2, 3], { batchSize: 16, balance: "measured", compression: { method: "none" } as never, initialRates: [] }, grid, parallel);

  it("orders a pipe_step with the chains and their equal shares", () => {
    const s = strategy();
    const plan = s.plan(5, [0, 1, 2, 3], 4, { wantHash: true });
    expect(s.order(plan)).toEqual({ op: "pipe_step", step: 5, chains: [[0, 1], [2, 3]], shares: [8, 8], want_hash: true });
  });

  it("folds the stages' reports: the global loss, per-stage figures, hashes compared per stage", () => {
    const s = strategy();
    const plan = s.plan(0, [0, 1, 2, 3], 4, { wantHash: false });
    const reports = new Map([0, 1, 2, 3].map((r) => [r, report(r, r % 2)]));
    const result = s.fold(plan, reports);
    expect(result.loss).toBe(2.5);
    expect(result.samples).toBe(16);
    expect(result.stages.map((x) => [x.rank, x.stage, x.compute_ms])).toEqual([[0, 0, 200], [1, 1, 200], [2, 0, 200], [3, 1, 200]]);
    expect(s.hashGroup(1)).toBe(1);
    expect(s.hashGroup(2)).toBe(0);
  });

  it("refuses reports whose stages disagree about skipping or name another stage", () => {
    const s = strategy();
    const plan = s.plan(0, [0, 1, 2, 3], 4, { wantHash: false });
    const skipped = new Map([0, 1, 2, 3].map((r) => [r, report(r, r % 2, r === 3 ? { skipped: true } : {})]));
    expect(() => s.fold(plan, skipped)).toThrow(/disagree about skipping/);
    const wrong = new Map([0, 1, 2, 3].map((r) => [r, report(r, r === 1 ? 0 : r % 2)]));
    expect(() => s.fold(plan, wrong)).toThrow(/reports stage 0, it holds stage 1/);
  });

  it("reroutes after a loss and hands a joiner its stage's state from that stage's holder", () => {
    const s = strategy();
    s.membersChanged({ members: [0, 2, 3], left: [1], joined: [] });
    expect(s.routes).toEqual([[0, 3], [2, 3]]);
    expect(s.handovers([0, 1, 2, 3], [1])).toEqual([{ source: 3, members: [1, 3] }]);
    expect(() => s.handovers([0, 1], [1])).toThrow(StageLostError);
  });
});

describe("mergeSafetensors", () => {
  it("joins the stages' tensors under their own names and keeps the metadata", () => {
    const t = (n: number) => ({ dtype: "F32", shape: [n], data: new Uint8Array(4 * n).fill(n) });
    const a = encodeSafetensors({ metadata: { format: "pt", step: "20" }, tensors: new Map([["0.weight", t(2)], ["0.bias", t(1)]]) });
    const b = encodeSafetensors({ metadata: { format: "pt", step: "20" }, tensors: new Map([["2.weight", t(3)]]) });
    const merged = parseSafetensors(mergeSafetensors([{ what: "stage 0", bytes: a }, { what: "stage 1", bytes: b }]), "merged");
    expect([...merged.tensors.keys()]).toEqual(["0.weight", "0.bias", "2.weight"]);
    expect(merged.tensors.get("2.weight")!.data).toEqual(new Uint8Array(12).fill(3));
    expect(merged.metadata).toMatchObject({ format: "pt", step: "20", stages: "2" });
    expect(() => mergeSafetensors([{ what: "stage 0", bytes: a }, { what: "stage 1", bytes: a }])).toThrow(/also in an earlier stage/);
    expect(() => parseSafetensors(new Uint8Array(3), "short")).toThrow(/too short/);
  });
});
