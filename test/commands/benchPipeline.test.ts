import { describe, expect, it } from "vitest";
import { formatBenchReport, formatPipeline, planFromProfile } from "../../src/commands/bench.js";
import { jobConfigSchema } from "../../src/config/schema.js";
import type { LayerProfile } from "../../src/runtime/layerProfile.js";

const MB = 1e6;
const profile: LayerProfile = {
  ok: true,
  sequential: true,
  model: "Sequential (4,000 parameters)",
  micro_batch: 8,
  base_rss_bytes: 10 * MB,
  layers: Array.from({ length: 4 }, (_, i) => ({ name: String(i), type: "Linear", params: 1000, param_bytes: 4 * MB, activation_bytes: 32_000, saved_bytes: 64_000, forward_backward_s: 0.0015 })),
};
const config = jobConfigSchema.parse({ name: "p", task: "task.py", steps: 10, batch_size: 64, local_workers: 2, parallel: { pipeline_stages: 2 } });

describe("bench's pipeline plan", () => {
  it("plans this host's workers from the profile and prints the layers, the plan and why", () => {
    const r = planFromProfile(profile, config, 2, null);
    expect(r.error).toBeUndefined();
    expect(r.plan!.bounds).toEqual([0, 2, 4]);
    expect(r.pipeline).toMatchObject({ stages: 2, micro_batches: 4, schedule: "1f1b", workers: 2, workers_from: "local_workers", max_memory_bytes: null });
    const lines = formatPipeline({ layers: profile.layers, plan: r.plan, pipeline: r.pipeline });
    expect(lines[0]).toBe("layers of Sequential (4,000 parameters): micro-batch 8, a worker's base 10.0 MB");
    expect(lines[1]).toMatch(/^ {2}# +name +type +params +activation +saved +ms$/);
    expect(lines[2]).toMatch(/^ {2}0 +0 +Linear +1,000 +32\.0 kB +64\.0 kB +1\.50$/);
    expect(lines).toContain("pipeline plan: 2 stages x 1 replica over 2 workers like this host (no memory limit: --max-memory sets one), 4 micro-batches, 1f1b");
    expect(lines.some((l) => /^ {2}stage 1 +layers 2-3 /.test(l))).toBe(true);
    expect(lines).toContain("why");
    expect(lines.some((l) => l.startsWith("  - stage 0 holds layers 0-1"))).toBe(true);
  });

  it("shows why no plan fits, and the report keeps the profile", () => {
    const r = planFromProfile(profile, config, 2, 20 * MB);
    expect(r.plan).toBeNull();
    expect(r.error?.exitCode).toBe(2);
    expect(r.pipeline.plan_error).toMatch(/^parallel\.pipeline_stages: the model does not fit: .*its providers allow 20\.0 MB/);
    const text = formatBenchReport({
      host: { devices: [{ id: "cpu", name: "CPU", memory_bytes: 8e9, cores: 4 } as never], device: "cpu", matmul_gflops: { fp32: 1, bf16: null, fp16: null }, memory_gbps: 1, h2d_gbps: null },
      peers: [],
      layers: profile.layers,
      plan: r.plan,
      pipeline: r.pipeline,
    });
    expect(text).toContain("(20.0 MB each)");
    expect(text).toContain("  no plan: parallel.pipeline_stages: the model does not fit");
  });
});
