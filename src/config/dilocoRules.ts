/** DiLoCo's config rules (README, "DiLoCo"), checked on the raw document with the schema's own issues. */
import { DILOCO_CODECS, type RawIssue } from "./schema.js";

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
const isInt = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v);

/** DiLoCo's rules between its keys and the job's (README, "DiLoCo"). */
export function dilocoIssues(raw: Record<string, unknown>): RawIssue[] {
  const s = raw.strategy;
  if (!isRecord(s) || s.name !== "diloco") return [];
  const issues: RawIssue[] = [];
  const h = s.inner_steps === undefined ? 100 : s.inner_steps;
  const f = s.fragments === undefined ? 1 : s.fragments;
  if (typeof s.codec === "string" && (s.codec === "powersgd" || s.codec === "topk")) {
    issues.push({ path: ["strategy", "codec"], message: `${s.codec} cannot carry a pseudo-gradient (it keeps per-step state of a gradient's shape); expected one of ${DILOCO_CODECS.join(" | ")}`, replaces: true });
  }
  if (raw.compression !== undefined) {
    issues.push({ path: ["compression"], message: "is not used under strategy diloco: strategy.codec carries the pseudo-gradient (none | fp16 | bf16 | int8 | int4)" });
  }
  if (!isInt(h) || h < 1) return issues; // the schema reports it
  if (isInt(f) && f >= 1) {
    if (h % f !== 0) issues.push({ path: ["strategy", "fragments"], message: `must divide strategy.inner_steps (${h}) so that fragments sync every inner_steps / fragments steps, found ${f}` });
    else if (isInt(s.overlap_steps) && s.overlap_steps >= h / f) {
      issues.push({ path: ["strategy", "overlap_steps"], message: `expected an integer < inner_steps / fragments (${h / f}), found ${s.overlap_steps}` });
    }
  }
  if (isInt(raw.steps) && raw.steps % h !== 0) {
    issues.push({ path: ["steps"], message: `counts inner steps under diloco and must be a multiple of strategy.inner_steps (${h}), found ${raw.steps}` });
  }
  for (const section of ["eval", "checkpoint"] as const) {
    const every = isRecord(raw[section]) ? (raw[section] as Record<string, unknown>).every : undefined;
    if (isInt(every) && every > 0 && every % h !== 0) {
      issues.push({ path: [section, "every"], message: `counts inner steps under diloco and must be a multiple of strategy.inner_steps (${h}), found ${every}` });
    }
  }
  return issues;
}

