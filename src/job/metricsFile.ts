import { z } from "zod";
import type { StepMetrics } from "./runDir.js";

/**
 * metrics.jsonl, read back (to resume, to list and to report a run): one step's metrics
 * per line. A line is checked before use, since the file is on disk where a crash or a
 * person may have changed it; lenient about fields older runs lack.
 */
const num = z.number().finite();
const count = z.number().int().min(0);

export const stepMetricsSchema = z
  .object({
    step: count,
    loss: num.nullable(),
    lr: num,
    samples: num,
    wall_s: num,
    step_s: num,
    bytes_sent: num,
    uncompressed_bytes: num,
    skipped: z.boolean().optional(),
    eval: z.record(z.string().max(256), num).optional(),
    eval_s: num.optional(),
    workers: z.array(
      z
        .object({
          rank: count,
          samples: num,
          share: num.optional(),
          compute_s: num.optional(),
          forward_backward_s: num.nullable().optional(),
          comm_s: num.optional(),
          idle_s: num.optional(),
          bytes_sent: num.optional(),
          uncompressed_bytes: num.optional(),
        })
        .passthrough(),
    ),
  })
  .passthrough();

/** The first problem zod found, as `field: message`. */
export function firstProblem(error: z.ZodError): string {
  const issue = error.issues[0];
  return `${issue.path.join(".") || "(root)"}: ${issue.message}`;
}

/**
 * Every line of metrics.jsonl that is a step's metrics, sorted by step, and the damaged
 * lines (number and why). A last line cut short by a crash is no damage.
 */
export function parseMetricsLines(text: string): { metrics: StepMetrics[]; damaged: { line: number; why: string }[] } {
  const metrics: StepMetrics[] = [];
  const damaged: { line: number; why: string }[] = [];
  const lines = text.split("\n");
  lines.forEach((line, i) => {
    if (!line.trim()) return;
    let raw: unknown;
    try {
      raw = JSON.parse(line);
    } catch {
      if (lines.slice(i + 1).some((l) => l.trim())) damaged.push({ line: i + 1, why: "not JSON" });
      return;
    }
    const parsed = stepMetricsSchema.safeParse(raw);
    if (parsed.success) metrics.push(parsed.data as unknown as StepMetrics);
    else damaged.push({ line: i + 1, why: firstProblem(parsed.error) });
  });
  return { metrics: metrics.sort((a, b) => a.step - b.step), damaged };
}
