import { describe, expect, it } from "vitest";
import { predictAllReduceS } from "../../../src/collective/costModel.js";
import { parseConfigText } from "../../../src/config/load.js";
import { CollectivePlanner, directLinksSpec, directMinMembers, estimateGradientBytes } from "../../../src/job/coordinator/collective.js";
import path from "node:path";
import { REPO_ROOT } from "../../helpers/processes.js";

const TASK = path.join(REPO_ROOT, "examples", "mnist", "task.py");
const config = (extra = "") => parseConfigText(`name: c\ntask: ${TASK}\nsteps: 10\nbatch_size: 8\n${extra}`, "/tmp/nimble-collective-planner/nimble.yaml").config;
/** 4 members over 100 Mbit/s links with a 100 ms round trip. */
const WAN = [0, 1, 2, 3].map((rank) => ({ rank, to: (rank + 1) % 4, rtt_ms: 100, upload_bytes_per_s: 12.5e6 }));

describe("the coordinator's choice of ring or direct", () => {
  it("links pairs for direct from 2 members, for auto from 3, never for ring or a pipeline", () => {
    expect(directMinMembers(config())).toBe(3);
    expect(directMinMembers(config("collective: {algorithm: direct}\n"))).toBe(2);
    expect(directMinMembers(config("collective: {algorithm: ring}\n"))).toBeNull();
    expect(directMinMembers(config("local_workers: 2\nparallel: {pipeline_stages: 2}\ncompression: {method: none}\n"))).toBeNull();
    expect(directLinksSpec(config())).toEqual({ direct_min_members: 3, direct_max_members: 32 });
    expect(directLinksSpec(config("collective: {algorithm: direct}\n"))).toEqual({ direct_min_members: 2 });
    expect(directLinksSpec(config("collective: {algorithm: ring}\n"))).toBeUndefined();
  });

  it("auto over slow, far links: direct for the gradient all-reduce, predictions from the bottleneck link, a size rule for the orders", () => {
    const p = new CollectivePlanner(config());
    expect(p.wantsLinks(4)).toBe(true);
    expect(p.wantsLinks(2)).toBe(false);
    p.setLinks([...WAN, { rank: 3, to: 0, rtt_ms: 120, upload_bytes_per_s: 10e6 }]);
    expect(p.costs.alphaS).toBeCloseTo(0.06, 9);
    expect(p.costs.betaSPerByte).toBeCloseTo(1e-7, 12);
    const { algorithm, predictedS } = p.choose(4, 1e6);
    expect(algorithm).toBe("direct");
    expect(predictedS.direct).toBeLessThan(predictedS.ring);
    expect(predictedS.ring).toBeCloseTo(predictAllReduceS("ring", 4, 1e6, p.costs), 12);
    // The rule: direct up to the size where the ring becomes no slower (or at any size).
    const max = p.directMaxBytes(4);
    if (max !== null) {
      expect(p.choose(4, max).algorithm).toBe("direct");
      expect(p.choose(4, max * 1.01 + 2).algorithm).toBe("ring");
    }
    expect(p.orderField(4)).toEqual({ direct_max_bytes: max });
    // Two members: the ring's own schedule, no pairs: ring, nothing in the orders.
    expect(p.orderField(2)).toBeUndefined();
    expect(p.choose(2, 1e6).algorithm).toBe("ring");
  });

  it("on loopback, where messages cost more than latency, auto keeps large all-reduces on the ring", () => {
    const p = new CollectivePlanner(config());
    p.setLinks([{ rtt_ms: 0.05, upload_bytes_per_s: 2e9 }]);
    const max = p.directMaxBytes(8);
    expect(max).not.toBeNull();
    expect(p.choose(8, 64 * 2 ** 20).algorithm).toBe("ring");
  });

  it("forced choices: direct for every size from 2 members, ring never in the orders", () => {
    const d = new CollectivePlanner(config("collective: {algorithm: direct}\n"));
    expect(d.orderField(2)).toEqual({ direct_max_bytes: null });
    expect(d.choose(3, 1e9).algorithm).toBe("direct");
    expect(d.orderField(1)).toBeUndefined();
    const r = new CollectivePlanner(config("collective: {algorithm: ring}\n"));
    expect(r.enabled).toBe(false);
    expect(r.tracked).toBe(true);
    expect(r.orderField(8)).toBeUndefined();
    expect(r.choose(8, 10).algorithm).toBe("ring");
  });

  it("observes each all-reduce by the member that waited least, and refines the latency from them", () => {
    const p = new CollectivePlanner(config());
    p.setLinks(WAN);
    const bytes = 200_000;
    // What the model predicts at alpha 80 ms (the measured link says 50): what the members saw, plus waiting.
    const truth = predictAllReduceS("direct", 4, bytes, { ...p.costs, alphaS: 0.08 });
    for (let step = 0; step < 3; step++) {
      const reports = [0, 1, 2, 3].map((r) => ({ collectives: [{ algorithm: "direct" as const, bytes, seconds: truth + r * 0.05 }, { algorithm: "direct" as const, bytes: 1000, seconds: 1 }] }));
      p.observe(reports, 4);
    }
    expect(p.gradientBytes).toBe(bytes);
    const s = p.summary(4);
    expect(s.observed.direct.count).toBe(6);
    expect(s.observed.ring.count).toBe(0);
    // the six observations: three at alpha 0.08, three of 1 s at 1000 bytes (far more): the median lies between
    expect(s.refined_alpha_s).toBeGreaterThanOrEqual(0.08 - 1e-6);
    expect(p.costs.alphaS).toBe(s.refined_alpha_s);
    expect(s.link).toMatchObject({ source: "measured", rtt_ms: 100, rate_bytes_per_s: 12.5e6 });
    expect(s.predicted_s.direct).toBeGreaterThan(0);
  });

  it("once both were seen at the gradient's size, the one measured faster carries it, whatever the model predicts", () => {
    // As in bench:wan's char-LM rows: the probe underrated the link, the refined latency fell to
    // 0, the model tied the two, and the tie went to the ring, measured 50% slower.
    const p = new CollectivePlanner(config());
    p.setLinks(WAN);
    const bytes = 3_757_440;
    const seen = (algorithm: "ring" | "direct", seconds: number) =>
      p.observe([0, 1, 2, 3].map(() => ({ collectives: [{ algorithm, bytes, seconds }] })), 4);
    for (let i = 0; i < 3; i++) seen("ring", 0.31);
    for (let i = 0; i < 2; i++) seen("direct", 0.2);
    seen("direct", 0.2);
    expect(p.choose(4, bytes).algorithm).toBe("direct");
    const max = p.directMaxBytes(4);
    expect(max === null || max >= bytes).toBe(true);
    for (let i = 0; i < 6; i++) seen("ring", 0.1); // the ring got faster: the median moves
    expect(p.choose(4, bytes).algorithm).toBe("ring");
    expect(p.directMaxBytes(4)).toBeLessThan(bytes);
  });

  it("refines to the latency that explains the observations exactly", () => {
    const p = new CollectivePlanner(config());
    p.setLinks(WAN);
    const seconds = (b: number) => predictAllReduceS("ring", 4, b, { ...p.costs, alphaS: 0.03 });
    p.observe([{ collectives: [1e5, 2e5, 3e5].map((b) => ({ algorithm: "ring" as const, bytes: b, seconds: seconds(b) })) }], 4);
    expect(p.summary(4).refined_alpha_s).toBeCloseTo(0.03, 6);
  });

  it("estimates the gradient's bytes from the parameters and the codec before any all-reduce is seen", () => {
    expect(estimateGradientBytes(config("compression: {method: none}\n"), 4000)).toBe(4000);
    expect(estimateGradientBytes(config("compression: {method: bf16}\n"), 4000)).toBe(2000);
    expect(estimateGradientBytes(config(), 4000)).toBe(4000);
    expect(estimateGradientBytes(config("strategy: {name: diloco, inner_steps: 10, fragments: 2, codec: int8}\n"), 4096)).toBe(Math.round((4096 * (1 + 4 / 256)) / 4 / 2));
  });

  it("says what it chose and why in one start-up line", () => {
    const p = new CollectivePlanner(config());
    p.setLinks(WAN);
    p.gradientBytes = 1_500_000;
    expect(p.describe(4)).toMatch(/^Collective: (ring|direct) for the gradient all-reduce of 1\.5 MB among 4: predicted ring [\d.]+ ms, direct [\d.]+ ms \(measured link: rtt 100\.0 ms, 12\.5 MB\/s\); direct/);
    expect(new CollectivePlanner(config("collective: {algorithm: ring}\n")).describe(4)).toMatch(/^Collective: ring \(as configured\)/);
    expect(p.describe(2)).toMatch(/^Collective: ring \(fewer than 3 members: ring\)/);
    expect(p.describe(33)).toMatch(/^Collective: ring \(more than 32 members: ring\)/);
    expect(p.wantsLinks(33)).toBe(false);
    expect(p.orderField(33)).toBeUndefined();
  });
});
