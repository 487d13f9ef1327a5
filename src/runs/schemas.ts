import { z } from "zod";

/**
 * What `runs`, `runs show` and `report` read back from a run directory, checked before use:
 * the files are on disk, where anyone (or a crash) may have changed them. Lenient about
 * fields older runs lack; strict about the types of the fields that are there.
 */
const num = z.number().finite();
const count = z.number().int().min(0);
const text = z.string().max(64 * 1024);

const workerSchema = z
  .object({ id: text, rank: count, provider: text, device: text, samples: num, share: num })
  .passthrough();

export const summarySchema = z
  .object({
    name: text,
    status: z.enum(["completed", "failed", "cancelled"]),
    error: text.optional(),
    steps: count,
    samples: num,
    wall_s: num,
    train_s: num.optional(),
    samples_per_s: num.nullable().optional(),
    final_loss: num.nullable(),
    eval: z.record(z.string().max(256), num).nullable().default(null),
    eval_step: count.nullable().optional(),
    bytes_sent: num,
    sync_bytes: num.optional(),
    uncompressed_bytes: num.optional(),
    compression_ratio: num.nullable().default(null),
    compression: z.object({ method: text }).passthrough().optional(),
    strategy: z.object({ name: text }).passthrough().optional(),
    diloco: z.object({ rounds: count, bytes_per_round: num, sync_s: num, hidden_s: num, hidden_fraction: num.nullable() }).passthrough().optional(),
    steps_skipped: z.array(count).default([]),
    left_out: z.array(z.object({ rank: count, id: text, after_step: count, reason: text }).passthrough()).default([]),
    faults: z
      .array(z.object({ step: count, wall_s: num.optional(), kind: text, ranks: z.array(count), reason: text, recovery_s: num.nullable() }).passthrough())
      .default([]),
    steps_redone: z.array(count).default([]),
    links: z.array(z.object({ rank: count, to: count, rtt_ms: num.nullable(), upload_bytes_per_s: num.nullable() }).passthrough()).default([]),
    workers: z.array(workerSchema),
    run_dir: text.optional(),
    started_at: text,
  })
  .passthrough();

export { firstProblem } from "../job/metricsFile.js";
