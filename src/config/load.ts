/**
 * Read and validate a job config. Every problem is reported as
 * `file:line:col: field: what was found, what is allowed`, all of them at once
 * (up to MAX_REPORTED), in one ConfigError (exit code 2).
 */
import { existsSync, statSync } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import path from "node:path";
import { isMap, isPair, isScalar, isSeq, LineCounter, parse as parseYamlValue, parseDocument, type Node } from "yaml";
import { z } from "zod";
import { ConfigError, errorMessage } from "../errors.js";
import {
  allowedKeysAt,
  crossFieldIssues,
  describeSchema,
  jobConfigSchema,
  schemaAt,
  type JobConfig,
  type RawIssue,
} from "./schema.js";
import { withParallelDefaults } from "./parallelRules.js";

export type { JobConfig } from "./schema.js";

export interface LoadedConfig {
  /** Absolute path of the config file. */
  path: string;
  /** Absolute directory holding the config file. */
  dir: string;
  config: JobConfig;
  /** Absolute path of the task file (resolved relative to `dir`). */
  taskPath: string;
  /** The config file's text, as read (with `--set` overrides written in). */
  text: string;
  /** Whether `--set` overrides changed it. */
  overridden?: boolean;
}

export interface ConfigIssue {
  /** 1-based. */
  line: number;
  /** 1-based. */
  col: number;
  /** Dotted field path, e.g. `optimizer.lr` or `providers[0].address`; "" for the document. */
  field: string;
  message: string;
  /** Set when the value came from the command line (`--set a.b=v`): named instead of a line. */
  source?: string;
}

/** `--set a.b=value`: a field path and a value read as YAML (numbers, booleans, [lists], {maps}). */
export interface ConfigOverride {
  path: (string | number)[];
  value: unknown;
  /** As given, for messages: `--set a.b=value`. */
  flag: string;
}

export function parseOverride(arg: string): ConfigOverride {
  const flag = `--set ${arg}`;
  const eq = arg.indexOf("=");
  const key = eq > 0 ? arg.slice(0, eq).trim() : "";
  if (!/^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|\d+))*$/.test(key)) {
    throw new ConfigError(`${flag}: expected field=value, such as steps=500 or optimizer.lr=0.001`, "name a field of the job config, with dots between sections");
  }
  let value: unknown;
  try {
    value = parseYamlValue(arg.slice(eq + 1), { maxAliasCount: 0 });
  } catch (err) {
    throw new ConfigError(`${flag}: the value is not valid YAML: ${firstLine(errorMessage(err))}`);
  }
  return { path: key.split(".").map((k) => (/^\d+$/.test(k) ? Number(k) : k)), value, flag };
}
export class ConfigIssuesError extends ConfigError {
  constructor(
    readonly file: string,
    readonly issues: ConfigIssue[],
  ) {
    super(formatIssues(file, issues), "fix the fields named above and run again");
    this.name = "ConfigError";
  }
}

export const MAX_REPORTED = 10;

export interface LoadOptions {
  /** Look for the task file (by its base name) in this folder: a run directory's copy, to resume. */
  taskInDir?: string;
  /** `--set` overrides, applied to the file's values before they are validated. */
  overrides?: ConfigOverride[];
  /** `nimble train --local N`: the local workers the job starts instead of local_workers (rules that count workers). */
  localWorkers?: number;
}

/** The task file names providers accept (src/protocol/messages.ts, `job.task.filename`). */
const TASK_FILENAME = /^[A-Za-z0-9._-]{1,128}\.py$/;
/** The task travels in one control message with the job spec. */
const MAX_TASK_BYTES = 256 * 1024 * 1024;

/** A job config is a few hundred bytes: anything past this is not one. */
export const MAX_CONFIG_BYTES = 1024 * 1024;

export async function loadConfig(file: string, opts: LoadOptions = {}): Promise<LoadedConfig> {
  return parseConfigText(await readConfigText(file, "pass the path of a YAML job config"), file, opts);
}

/** A config file's text: a regular file of bounded size (a FIFO would hang the read, a huge file the parser). */
export async function readConfigText(file: string, hint: string): Promise<string> {
  try {
    const info = await stat(file);
    if (!info.isFile()) throw new ConfigError(`${file}: cannot read config: not a regular file`, hint);
    if (info.size > MAX_CONFIG_BYTES) throw new ConfigError(`${file}: cannot read config: ${info.size} bytes is more than a config may have (${MAX_CONFIG_BYTES})`, hint);
    return await readFile(file, "utf8");
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === "ENOENT" ? "no such file" : code === "EISDIR" ? "is a directory" : errorMessage(err);
    throw new ConfigError(`${file}: cannot read config: ${why}`, hint);
  }
}

interface ParsedYaml {
  raw: unknown;
  issues: ConfigIssue[];
  /** Report an issue at a path (its line and column found in the document). */
  add: (p: (string | number)[], message: string, at?: "key" | "value") => void;
  /** Add `schema`'s issues; its result. */
  check: <S extends z.ZodTypeAny>(schema: S) => z.SafeParseReturnType<z.input<S>, z.output<S>>;
  /** Throw every issue so far, in file order. */
  finish: () => void;
  /** The text with the overrides written in (the text itself without any). */
  text: string;
}

/** YAML parsed for validation (with command-line overrides set into it): the plain value, and where to report an issue at a path. */
function parseYaml(text: string, file: string, overrides: ConfigOverride[] = []): ParsedYaml {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const issues = doc.errors.map((e): ConfigIssue => {
      const pos = e.linePos?.[0] ?? lineCounter.linePos(e.pos[0]);
      return { line: pos.line || 1, col: pos.col || 1, field: "", message: `invalid YAML: ${firstLine(e.message)}` };
    });
    throw new ConfigIssuesError(file, issues);
  }
  for (const o of overrides) {
    try {
      doc.setIn(o.path, doc.createNode(o.value));
    } catch (err) {
      throw new ConfigIssuesError(file, [{ line: 1, col: 1, field: fieldName(o.path), message: `cannot be set: ${errorMessage(err)}`, source: o.flag }]);
    }
  }
  let raw: unknown;
  try {
    raw = doc.toJS({ maxAliasCount: 1000 });
  } catch (err) {
    throw new ConfigIssuesError(file, [{ line: 1, col: 1, field: "", message: `invalid YAML: ${errorMessage(err)}` }]);
  }
  const issues: ConfigIssue[] = [];
  const add: ParsedYaml["add"] = (p, message, at = "value") => {
    const { line, col } = locateIn(doc.contents, lineCounter, p, at);
    // A field the command line set is reported under its flag, not at a line of the file.
    const o = overrides.find((o) => o.path.length <= p.length && o.path.every((k, i) => k === p[i]));
    issues.push({ line, col, field: fieldName(p), message, ...(o ? { source: o.flag } : {}) });
  };
  const check: ParsedYaml["check"] = (schema) => {
    const result = schema.safeParse(raw);
    if (!result.success) for (const issue of result.error.issues) for (const r of describeIssue(issue, raw, schema)) add(r.path, r.message, r.at);
    return result;
  };
  const finish = () => {
    if (issues.length === 0) return;
    issues.sort((a, b) => a.line - b.line || a.col - b.col);
    throw new ConfigIssuesError(file, dedupe(issues));
  };
  return { raw, issues, add, check, finish, text: overrides.length ? doc.toString() : text };
}

/**
 * Validate YAML `text` (as read from `file`) against `schema`: the parsed value with its
 * defaults, or a ConfigIssuesError naming each bad field with its line.
 */
export function validateYaml<S extends z.ZodTypeAny>(schema: S, text: string, file: string): z.output<S> {
  const parsed = parseYaml(text, file);
  const result = parsed.check(schema);
  parsed.finish();
  if (!result.success) throw new ConfigIssuesError(file, parsed.issues);
  return result.data;
}

/**
 * Validate config text as if read from `file` (which names it in messages and
 * anchors the task path; the task file itself must exist).
 */
export function parseConfigText(text: string, file: string, opts: LoadOptions = {}): LoadedConfig {
  const abs = path.resolve(file);
  const dir = path.dirname(abs);
  const { raw, add, check, finish, issues, text: effective } = parseYaml(text, file, opts.overrides);
  const result = check(jobConfigSchema);
  for (const r of crossFieldIssues(raw, { localWorkers: opts.localWorkers })) {
    // A rule that explains a value better than the schema did replaces the schema's issue there.
    const field = fieldName(r.path);
    for (let i = issues.length - 1; i >= 0; i--) if (issues[i].field === field && r.replaces) issues.splice(i, 1);
    add(r.path, r.message);
  }

  // The task file: checked whenever `task` itself is a usable string.
  let taskPath = "";
  const task = isRecord(raw) ? raw.task : undefined;
  if (typeof task === "string" && task.length > 0) {
    taskPath = opts.taskInDir ? path.join(opts.taskInDir, path.basename(task)) : path.resolve(dir, task);
    if (!existsSync(taskPath)) {
      add(["task"], `task file not found: ${JSON.stringify(task)} (looked for ${taskPath})`);
    } else if (statSync(taskPath).isDirectory()) {
      // A task package: the folder ships, its task.py is the entry point (src/job/package.ts).
      if (!existsSync(path.join(taskPath, "task.py"))) add(["task"], `the task folder ${taskPath} has no task.py (its entry point)`);
    } else if (!statSync(taskPath).isFile()) {
      add(["task"], `task must name a Python file or a folder holding task.py, found neither: ${taskPath}`);
    } else if (!TASK_FILENAME.test(path.basename(taskPath))) {
      // What providers accept: they write the task under this name in the job's folder.
      add(["task"], `the task file's name ${JSON.stringify(path.basename(taskPath))} must be 1 to 128 characters from A-Z a-z 0-9 . _ - ending in .py`);
    } else if (statSync(taskPath).size > MAX_TASK_BYTES) {
      add(["task"], `the task file is ${statSync(taskPath).size} bytes, more than a job can carry (${MAX_TASK_BYTES})`);
    }
  }

  finish();
  if (!result.success) throw new ConfigIssuesError(file, issues);
  return { path: abs, dir, config: withParallelDefaults(result.data, raw), taskPath, text: effective, overridden: (opts.overrides ?? []).length > 0 };
}

function formatIssues(file: string, issues: ConfigIssue[]): string {
  const shown = issues.slice(0, MAX_REPORTED).map((i) => {
    const where = i.source ?? `${file}:${i.line}:${i.col}`;
    return i.field ? `${where}: ${i.field}: ${i.message}` : `${where}: ${i.message}`;
  });
  if (issues.length > MAX_REPORTED) shown.push(`... and ${issues.length - MAX_REPORTED} more problems`);
  const head = issues.length === 1 ? `invalid config ${file}:` : `invalid config ${file} (${issues.length} problems):`;
  return [head, ...shown.map((s) => `  ${s}`)].join("\n");
}

function dedupe(issues: ConfigIssue[]): ConfigIssue[] {
  const seen = new Set<string>();
  return issues.filter((i) => {
    const k = `${i.line}:${i.col}:${i.field}:${i.message}`;
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

function firstLine(s: string): string {
  return s
    .split("\n")[0]!
    .replace(/ at line \d+, column \d+:?\s*$/, "")
    .trim();
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

export function fieldName(p: (string | number)[]): string {
  let out = "";
  for (const seg of p) out += typeof seg === "number" ? `[${seg}]` : out ? `.${seg}` : seg;
  return out;
}

function valueAt(raw: unknown, p: (string | number)[]): unknown {
  let v: unknown = raw;
  for (const seg of p) {
    if (v === null || typeof v !== "object") return undefined;
    v = (v as Record<string | number, unknown>)[seg];
  }
  return v;
}

/** How a found value reads in a message: `"ten" (a string)`, `-1`, `a mapping`. */
export function describeFound(v: unknown): string {
  if (v === undefined) return "nothing";
  if (v === null) return "an empty value";
  if (typeof v === "string") return `${JSON.stringify(v)} (a string)`;
  if (typeof v === "number" || typeof v === "boolean") return String(v);
  if (Array.isArray(v)) return `a list of ${v.length}`;
  if (typeof v === "object") return "a mapping";
  return typeof v;
}

interface Described extends RawIssue {
  at?: "key" | "value";
}

function describeIssue(issue: z.ZodIssue, raw: unknown, root: z.ZodTypeAny): Described[] {
  const p = issue.path;
  const found = valueAt(raw, p);
  const expected = describeSchema(schemaAt(p, raw, root));
  const expect = (fallback: string) => `expected ${expected ?? fallback}, found ${describeFound(found)}`;

  switch (issue.code) {
    case "unrecognized_keys": {
      const allowed = allowedKeysAt(p, raw, root) ?? [];
      const where = p.length ? ` in ${fieldName(p)}` : "";
      const disc = valueAt(raw, [...p, "name"]);
      const variant = typeof disc === "string" && p.length ? ` (name: ${disc})` : "";
      return issue.keys.map((k) => ({
        path: [...p, k],
        at: "key" as const,
        message: `unknown key ${JSON.stringify(k)}${where}${variant}; allowed keys: ${allowed.join(", ")}`,
      }));
    }
    case "invalid_type":
      if (found === undefined) {
        return [{ path: p, message: `missing required field; expected ${expected ?? issue.expected}` }];
      }
      if (p.length === 0) {
        const what = found === null ? "an empty document" : describeFound(found);
        const some = root instanceof z.ZodObject ? Object.keys(root.shape as object).slice(0, 4).join(", ") : "";
        return [{ path: p, message: `expected a mapping of settings (${some}, ...), found ${what}` }];
      }
      return [{ path: p, message: expect(issue.expected) }];
    case "invalid_union_discriminator":
      return [
        {
          path: p,
          message: `${found === undefined ? "missing; expected" : "expected"} one of ${issue.options
            .map(String)
            .join(" | ")}${found === undefined ? "" : `, found ${describeFound(found)}`}`,
        },
      ];
    case "invalid_literal":
      return [{ path: p, message: `expected ${JSON.stringify(issue.expected)}, found ${describeFound(found)}` }];
    case "too_small":
    case "too_big":
      if (issue.type === "array" && Array.isArray(found)) {
        return [{ path: p, message: `expected ${expected ?? "a different number of items"}, found ${describeFound(found)}` }];
      }
      return [{ path: p, message: expect(issue.message) }];
    case "invalid_string":
    case "not_finite":
    case "not_multiple_of":
      return [{ path: p, message: expect(issue.message) }];
    case "invalid_enum_value":
      return [{ path: p, message: `expected one of ${issue.options.join(" | ")}, found ${describeFound(found)}` }];
    default:
      return [{ path: p, message: `${issue.message}, found ${describeFound(found)}` }];
  }
}

/**
 * Position of the node at `p` (its key when `at` is "key" or the value is empty);
 * when the path runs out (a missing field), the closest existing ancestor's key.
 */
function locateIn(
  root: Node | null,
  lc: LineCounter,
  p: (string | number)[],
  at: "key" | "value",
): { line: number; col: number } {
  const pos = (n: Node | null | undefined) => {
    const off = n?.range?.[0];
    if (off === undefined) return undefined;
    const lp = lc.linePos(off);
    return { line: lp.line || 1, col: lp.col || 1 };
  };
  let node: Node | null = root;
  let best = pos(root) ?? { line: 1, col: 1 };
  for (let i = 0; i < p.length; i++) {
    const seg = p[i]!;
    const last = i === p.length - 1;
    if (isMap(node)) {
      const pair = node.items.find((it) => isPair(it) && isScalar(it.key) && String(it.key.value) === String(seg));
      if (!pair) return best;
      const keyPos = pos(pair.key as Node) ?? best;
      const val = pair.value as Node | null;
      const valPos = val && !(isScalar(val) && val.value === null && val.source === "") ? pos(val) : undefined;
      if (last) return at === "key" ? keyPos : (valPos ?? keyPos);
      best = keyPos;
      node = val;
    } else if (isSeq(node) && typeof seg === "number") {
      const item = node.items[seg] as Node | undefined;
      if (!item) return best;
      best = pos(item) ?? best;
      if (last) return best;
      node = item;
    } else {
      return best;
    }
  }
  return best;
}

/**
 * A problem found after loading (e.g. by a worker that built the model: a PowerSGD rank no
 * weight matrix can take), reported like a load error: file, line and field.
 */
export function configErrorAt(loaded: LoadedConfig, field: string, message: string): ConfigIssuesError {
  const lineCounter = new LineCounter();
  const doc = parseDocument(loaded.text, { lineCounter });
  const p = field.split(".").map((seg) => (/^\d+$/.test(seg) ? Number(seg) : seg));
  const { line, col } = locateIn(doc.contents, lineCounter, p, "value");
  // Workers' messages name their field too: it is said once, before the colon.
  const own = message.startsWith(`${field} `) ? message.slice(field.length + 1) : message;
  return new ConfigIssuesError(loaded.path, [{ line, col, field, message: own }]);
}
