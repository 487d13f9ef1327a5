import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ConfigError } from "../../src/errors.js";
import { ConfigIssuesError, loadConfig, parseConfigText, parseOverride, type ConfigIssue, type LoadOptions } from "../../src/config/load.js";
import { checkPipelineWorkers } from "../../src/config/parallelRules.js";

/** The message parsing `text` as `file` fails with ("" when it does not). */
function errorOf(text: string, file: string, opts?: LoadOptions): string {
  try {
    parseConfigText(text, file, opts);
  } catch (err) {
    return (err as Error).message;
  }
  return "";
}

/** A task file for configs whose task is beside the point (providers take only .py names). */
const PY_TASK = path.join(mkdtempSync(path.join(tmpdir(), "nimble-config-task-")), "task.py");
writeFileSync(PY_TASK, "x = 1\n");

let dir: string;
let file: string;

beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), "nimble-config-"));
  writeFileSync(path.join(dir, "task.py"), "def build_model(args): pass\n");
  mkdirSync(path.join(dir, "adir"));
  file = path.join(dir, "nimble.yaml");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BASE = `name: mnist-cnn
task: task.py
steps: 300
batch_size: 64
`;

function issuesOf(text: string): { err: ConfigIssuesError; issues: ConfigIssue[] } {
  try {
    parseConfigText(text, file);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    expect(err).toBeInstanceOf(ConfigIssuesError);
    expect((err as ConfigError).exitCode).toBe(2);
    return { err: err as ConfigIssuesError, issues: (err as ConfigIssuesError).issues };
  }
  throw new Error("expected a ConfigError");
}

describe("parseConfigText", () => {
  it("fills in every default", () => {
    const loaded = parseConfigText(BASE, file);
    expect(loaded.path).toBe(file);
    expect(loaded.dir).toBe(dir);
    expect(loaded.taskPath).toBe(path.join(dir, "task.py"));
    expect(loaded.text).toBe(BASE);
    expect(loaded.config).toEqual({
      name: "mnist-cnn",
      task: "task.py",
      task_args: {},
      steps: 300,
      batch_size: 64,
      seed: 0,
      optimizer: { name: "sgd", lr: 0.01, momentum: 0, nesterov: false, weight_decay: 0, no_decay: false },
      lr_schedule: { name: "constant" },
      grad_clip: 0,
      precision: "fp32",
      prefetch: 2,
      compression: { method: "powersgd", rank: 4, start_step: 10, min_compression_rate: 2, error_feedback: true, warm_start: true, seed: 0 },
      strategy: { name: "sync", orders_ahead: "auto" },
      collective: { algorithm: "auto" },
      balance: "measured",
      leave_out_slow: true,
      faults: { heartbeat_s: 10, min_workers: 1, max_restarts: 3, wait_s: 300 },
      eval: { every: 0, samples: 1000, batch_size: 256 },
      checkpoint: { every: 0, keep: 3 },
      providers: [],
      local_workers: 2,
      output: "runs",
      package_limit_mb: 64,
      requirements: [],
    });
  });

  it("fills in defaults inside given sections, per optimizer kind", () => {
    const { config } = parseConfigText(
      BASE +
        `optimizer:
  name: adamw
  lr: 3.0e-4
lr_schedule:
  name: warmup_cosine
  warmup_steps: 30
eval:
  every: 100
checkpoint:
task_args:
  hidden: 128
providers:
  - address: 127.0.0.1:7070
    token: abc
  - address: wss://gpu.example.org:7071
`,
      file,
    );
    expect(config.optimizer).toEqual({ name: "adamw", lr: 3e-4, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.01, no_decay: false });
    expect(config.lr_schedule).toEqual({ name: "warmup_cosine", warmup_steps: 30, min_lr: 0, decay_steps: 0 });
    expect(config.eval).toEqual({ every: 100, samples: 1000, batch_size: 256 });
    expect(config.checkpoint).toEqual({ every: 0, keep: 3 });
    expect(config.task_args).toEqual({ hidden: 128 });
    expect(config.providers).toEqual([
      { address: "127.0.0.1:7070", token: "abc", optional: false },
      { address: "wss://gpu.example.org:7071", optional: false },
    ]);
  });

  it("defaults an optimizer without a name to sgd", () => {
    const { config } = parseConfigText(BASE + "optimizer:\n  lr: 0.1\n  momentum: 0.9\n  nesterov: true\n", file);
    expect(config.optimizer).toEqual({ name: "sgd", lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0, no_decay: false });
  });

  it("reports malformed YAML with its line", () => {
    const { err, issues } = issuesOf("name: x\ntask: task.py\nsteps: [1, 2\nbatch_size: 4\n");
    expect(issues.length).toBeGreaterThan(0);
    expect(issues[0]!.line).toBe(4);
    expect(issues[0]!.message).toMatch(/^invalid YAML: /);
    expect(err.message).toContain(`${file}:4:`);
  });

  it("reports duplicate keys as malformed YAML", () => {
    const { issues } = issuesOf(BASE + "steps: 5\n");
    expect(issues[0]!.line).toBe(5);
    expect(issues[0]!.message).toMatch(/invalid YAML: .*unique/i);
  });

  it("names line, field, what was found and what is expected for a wrong type", () => {
    const { err, issues } = issuesOf("name: x\ntask: task.py\nsteps: \"ten\"\nbatch_size: 4\n");
    expect(issues).toEqual([
      { line: 3, col: 8, field: "steps", message: 'expected an integer >= 1, found "ten" (a string)' },
    ]);
    expect(err.message).toContain(`${file}:3:8: steps: expected an integer >= 1, found "ten" (a string)`);
  });

  it("rejects non-integers and out-of-range numbers", () => {
    const { issues } = issuesOf(BASE.replace("batch_size: 64", "batch_size: 6.5") + "seed: -1\nlocal_workers: 65\n");
    expect(issues.map((i) => [i.line, i.field, i.message])).toEqual([
      [4, "batch_size", "expected an integer >= 1, found 6.5"],
      [5, "seed", "expected an integer >= 0 and <= 9007199254740991, found -1"],
      [6, "local_workers", "expected an integer >= 1 and <= 64, found 65"],
    ]);
  });

  it("rejects an unknown top-level key, naming it and the allowed keys", () => {
    const { issues } = issuesOf(BASE + "stpes: 10\n");
    expect(issues).toHaveLength(1);
    expect(issues[0]).toMatchObject({ line: 5, col: 1, field: "stpes" });
    expect(issues[0]!.message).toContain('unknown key "stpes"');
    expect(issues[0]!.message).toContain(
      "allowed keys: name, task, task_args, steps, batch_size, seed, optimizer, lr_schedule, grad_clip, precision, prefetch, compression, strategy, parallel, collective, balance, leave_out_slow, eval, checkpoint, faults, providers, local_workers, output, package_limit_mb, requirements",
    );
  });

  it("rejects unknown nested keys, listing the keys allowed there", () => {
    const { issues } = issuesOf(
      BASE + "eval:\n  every: 10\n  sample: 5\noptimizer:\n  name: adam\n  momentum: 0.9\nproviders:\n  - address: h:1\n    tokn: x\n",
    );
    expect(issues.map((i) => [i.line, i.col, i.field])).toEqual([
      [7, 3, "eval.sample"],
      [10, 3, "optimizer.momentum"],
      [13, 5, "providers[0].tokn"],
    ]);
    expect(issues[0]!.message).toBe('unknown key "sample" in eval; allowed keys: every, samples, batch_size');
    expect(issues[1]!.message).toBe(
      'unknown key "momentum" in optimizer (name: adam); allowed keys: name, lr, betas, eps, weight_decay, no_decay',
    );
    expect(issues[2]!.message).toContain("allowed keys: address, token, key");
  });

  it("names the task line when the task file is missing", () => {
    const { err, issues } = issuesOf("name: x\nsteps: 3\nbatch_size: 4\ntask: nothere.py\n");
    expect(issues).toHaveLength(1);
    expect(issues[0]).toMatchObject({ line: 4, col: 7, field: "task" });
    expect(issues[0]!.message).toContain("task file not found");
    expect(issues[0]!.message).toContain(path.join(dir, "nothere.py"));
    expect(err.message).toContain(`${file}:4:7: task: task file not found`);
  });

  it("takes a task folder that holds task.py (a package), and rejects one without it", () => {
    const { issues } = issuesOf(BASE.replace("task.py", "adir"));
    expect(issues[0]).toMatchObject({ line: 2, field: "task" });
    expect(issues[0]!.message).toMatch(/the task folder .*adir has no task\.py \(its entry point\)/);
    mkdirSync(path.join(dir, "pkg"), { recursive: true });
    writeFileSync(path.join(dir, "pkg", "task.py"), "x = 1\n");
    const loaded = parseConfigText(BASE.replace("task.py", "pkg"), file);
    expect(loaded.taskPath).toBe(path.join(dir, "pkg"));
    expect(loaded.config.package_limit_mb).toBe(64);
  });

  it("lists the optimizer names for a bad optimizer", () => {
    const { issues } = issuesOf(BASE + "optimizer:\n  name: rmsprop\n  lr: 0.1\n");
    expect(issues).toEqual([
      { line: 6, col: 9, field: "optimizer.name", message: 'expected one of sgd | adam | adamw, found "rmsprop" (a string)' },
    ]);
  });

  it("lists the schedule names for a bad lr_schedule", () => {
    const { issues } = issuesOf(BASE + "lr_schedule: {name: exponential}\n");
    expect(issues[0]).toMatchObject({ line: 5, field: "lr_schedule.name" });
    expect(issues[0]!.message).toContain("constant | linear | cosine | warmup_linear | warmup_cosine");
  });

  it("requires momentum > 0 for nesterov", () => {
    const { issues } = issuesOf(BASE + "optimizer:\n  name: sgd\n  lr: 0.1\n  nesterov: true\n");
    expect(issues).toHaveLength(1);
    expect(issues[0]).toMatchObject({ line: 8, col: 13, field: "optimizer.nesterov" });
    expect(issues[0]!.message).toContain("momentum > 0");
  });

  it("checks the optimizer's ranges", () => {
    const { issues } = issuesOf(BASE + "optimizer:\n  name: adam\n  lr: 0\n  betas: [0.9, 1.0]\n  eps: 0\n");
    expect(issues.map((i) => [i.line, i.field, i.message])).toEqual([
      [7, "optimizer.lr", "expected a number > 0, found 0"],
      [8, "optimizer.betas[1]", "expected a number >= 0 and < 1, found 1"],
      [9, "optimizer.eps", "expected a number > 0, found 0"],
    ]);
  });

  it("requires warmup_steps < steps", () => {
    const { issues } = issuesOf(BASE + "lr_schedule:\n  name: warmup_cosine\n  warmup_steps: 300\n");
    expect(issues).toEqual([
      {
        line: 7,
        col: 17,
        field: "lr_schedule.warmup_steps",
        message: "expected an integer < steps (300), found 300",
      },
    ]);
  });

  it("rejects providers together with local_workers", () => {
    const { issues } = issuesOf(BASE + "providers:\n  - address: 10.0.0.2:7070\nlocal_workers: 4\n");
    expect(issues).toHaveLength(1);
    expect(issues[0]).toMatchObject({ line: 7, col: 16, field: "local_workers" });
    expect(issues[0]!.message).toContain("providers");
    // An empty providers list is the same as none.
    expect(parseConfigText(BASE + "providers: []\nlocal_workers: 4\n", file).config.local_workers).toBe(4);
  });

  it("validates provider addresses", () => {
    const { issues } = issuesOf(BASE + "providers:\n  - address: gpu-box\n  - address: '[::1]:7070'\n");
    expect(issues).toHaveLength(1);
    expect(issues[0]).toMatchObject({ line: 6, col: 14, field: "providers[0].address" });
    expect(issues[0]!.message).toBe('expected host:port or wss://host:port, found "gpu-box" (a string)');
  });

  it("refuses plain ws:// addresses and keys that are not nimble keys, and takes a provider's key", () => {
    const { issues } = issuesOf(BASE + "providers:\n  - {address: 'ws://a:7070', token: t}\n  - {address: 'b:7070', key: 'ssh-ed25519 AAAA'}\n");
    expect(issues.map((i) => [i.field, i.message])).toEqual([
      ["providers[0].address", 'expected host:port or wss://host:port, found "ws://a:7070" (a string)'],
      ["providers[1].key", 'expected a nimble key, ed25519:<43 characters> (`nimble id` prints it), found "ssh-ed25519 AAAA" (a string)'],
    ]);
    const key = `ed25519:${"a".repeat(43)}`;
    expect(parseConfigText(BASE + `providers:\n  - {address: 'b:7070', key: '${key}'}\n`, file).config.providers[0]).toEqual({ address: "b:7070", key, optional: false });
  });

  it("reports missing required fields", () => {
    const { issues } = issuesOf("name: x\ntask: task.py\n");
    expect(issues.map((i) => [i.field, i.message])).toEqual([
      ["steps", "missing required field; expected an integer >= 1"],
      ["batch_size", "missing required field; expected an integer >= 1"],
    ]);
  });

  it("reports a missing nested field at its section", () => {
    const { issues } = issuesOf(BASE + "providers:\n  - token: abc\n");
    expect(issues[0]).toMatchObject({ line: 6, field: "providers[0].address" });
    expect(issues[0]!.message).toContain("missing required field");
  });

  it("rejects an empty document and a non-mapping", () => {
    expect(issuesOf("").issues[0]!.message).toContain("found an empty document");
    expect(issuesOf("- a\n- b\n").issues[0]!.message).toContain("found a list of 2");
  });

  it("reports all issues together, in file order, one per line", () => {
    const text = `name: "bad name!"
task: missing.py
steps: 0
batch_size: big
optimizer:
  name: sgd
  lr: -0.1
  bogus: 1
eval:
  every: -5
color: blue
`;
    const { err, issues } = issuesOf(text);
    expect(issues.map((i) => [i.line, i.field])).toEqual([
      [1, "name"],
      [2, "task"],
      [3, "steps"],
      [4, "batch_size"],
      [7, "optimizer.lr"],
      [8, "optimizer.bogus"],
      [10, "eval.every"],
      [11, "color"],
    ]);
    const lines = err.message.split("\n");
    expect(lines[0]).toBe(`invalid config ${file} (8 problems):`);
    expect(lines.slice(1).map((l) => l.trim().split(": ")[0])).toEqual([
      `${file}:1:7`,
      `${file}:2:7`,
      `${file}:3:8`,
      `${file}:4:13`,
      `${file}:7:7`,
      `${file}:8:3`,
      `${file}:10:10`,
      `${file}:11:1`,
    ]);
  });

  it("caps the listing at 10 problems", () => {
    const extra = Array.from({ length: 14 }, (_, i) => `k${i}: 1`).join("\n");
    const { err, issues } = issuesOf(BASE + extra + "\n");
    expect(issues).toHaveLength(14);
    const lines = err.message.split("\n");
    expect(lines).toHaveLength(12);
    expect(lines[11]!.trim()).toBe("... and 4 more problems");
  });
});

describe("loadConfig", () => {
  it("loads a file, resolving the task next to it", async () => {
    writeFileSync(file, BASE);
    const rel = path.relative(process.cwd(), file);
    const loaded = await loadConfig(rel);
    expect(loaded.path).toBe(file);
    expect(loaded.taskPath).toBe(path.join(dir, "task.py"));
    expect(loaded.config.steps).toBe(300);
  });

  it("throws a ConfigError for a missing config file", async () => {
    const missing = path.join(dir, "nope.yaml");
    await expect(loadConfig(missing)).rejects.toThrow(ConfigError);
    await expect(loadConfig(missing)).rejects.toThrow(/no such file/);
  });
});

describe("compression section", () => {
  const file = "/tmp/nimble-compression-test/nimble.yaml";
  const body = (section: string) => `name: c\ntask: ${PY_TASK}\nsteps: 10\nbatch_size: 8\n${section}`;

  it("defaults to PowerSGD rank 4 and fills each method's own defaults", () => {
    expect(parseConfigText(body(""), file).config.compression).toEqual({
      method: "powersgd",
      rank: 4,
      start_step: 10,
      min_compression_rate: 2,
      error_feedback: true,
      warm_start: true,
      seed: 0,
    });
    expect(parseConfigText(body("compression: {method: topk}\n"), file).config.compression).toEqual({
      method: "topk",
      ratio: 0.01,
      start_step: 10,
      error_feedback: true,
    });
    expect(parseConfigText(body("compression: {method: int8}\n"), file).config.compression).toEqual({ method: "int8" });
    expect(parseConfigText(body("compression: {rank: 2}\n"), file).config.compression).toMatchObject({ method: "powersgd", rank: 2 });
  });

  it("names an unknown method with its line and the allowed ones", () => {
    expect(() => parseConfigText(body("compression:\n  method: zip\n"), file)).toThrow(
      `${file}:6:11: compression.method: expected one of none | fp16 | bf16 | int8 | powersgd | topk, found "zip"`,
    );
  });

  it("rejects a rank below 1 and keys that belong to another method, with their lines", () => {
    let message = "";
    try {
      parseConfigText(body("compression:\n  method: powersgd\n  rank: 0\n  ratio: 0.1\n"), file);
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toContain(`${file}:7:9: compression.rank: expected an integer >= 1`);
    expect(message).toMatch(new RegExp(`${file}:8:\\d+: compression.ratio: unknown key "ratio"`));
  });
});

describe("collective section", () => {
  const file = "/tmp/nimble-collective-test/nimble.yaml";
  const body = (section: string) => `name: c\ntask: ${PY_TASK}\nsteps: 10\nbatch_size: 8\n${section}`;
  const message = (text: string) => {
    try {
      parseConfigText(text, file);
    } catch (err) {
      return (err as Error).message;
    }
    return "";
  };

  it("defaults to auto, also when the section is empty; takes ring and direct", () => {
    expect(parseConfigText(body(""), file).config.collective).toEqual({ algorithm: "auto" });
    expect(parseConfigText(body("collective:\n"), file).config.collective).toEqual({ algorithm: "auto" });
    expect(parseConfigText(body("collective: {}\n"), file).config.collective).toEqual({ algorithm: "auto" });
    expect(parseConfigText(body("collective: {algorithm: ring}\n"), file).config.collective).toEqual({ algorithm: "ring" });
    expect(parseConfigText(body("collective:\n  algorithm: direct\n"), file).config.collective).toEqual({ algorithm: "direct" });
  });

  it("names a bad algorithm or key with its line and what is allowed", () => {
    expect(message(body("collective:\n  algorithm: butterfly\n"))).toContain(`${file}:6:14: collective.algorithm: expected one of auto | ring | direct, found "butterfly"`);
    expect(message(body("collective: {algorithm: 3}\n"))).toContain(`${file}:5:25: collective.algorithm: expected 'auto' | 'ring' | 'direct', found 3`);
    expect(message(body("collective:\n  algoritm: ring\n"))).toContain(`${file}:6:3: collective.algoritm: unknown key "algoritm" in collective; allowed keys: algorithm`);
    expect(message(body("collective: direct\n"))).toMatch(new RegExp(`${file}:5:13: collective: expected a mapping`));
  });

  it("direct is not available with parallel (stage rings)", () => {
    expect(message(body("local_workers: 2\nparallel: {pipeline_stages: 2}\ncollective:\n  algorithm: direct\n"))).toContain(
      `${file}:8:14: collective.algorithm: direct is not available with parallel (pipeline stages all-reduce on their stage rings); use ring or auto`,
    );
    expect(parseConfigText(body("local_workers: 2\nparallel: {pipeline_stages: 2}\ncompression: {method: none}\ncollective: {algorithm: auto}\n"), file).config.collective.algorithm).toBe("auto");
  });
});

describe("strategy section", () => {
  const file = "/tmp/nimble-strategy-test/nimble.yaml";
  const body = (section: string) => `name: s\ntask: ${PY_TASK}\nsteps: 10\nbatch_size: 8\n${section}`;
  const messageOf = (text: string) => errorOf(text, file);

  it("defaults to sync, also when the section is empty or leaves out its name", () => {
    expect(parseConfigText(body(""), file).config.strategy).toEqual({ name: "sync", orders_ahead: "auto" });
    expect(parseConfigText(body("strategy:\n"), file).config.strategy).toEqual({ name: "sync", orders_ahead: "auto" });
    expect(parseConfigText(body("strategy: {}\n"), file).config.strategy).toEqual({ name: "sync", orders_ahead: "auto" });
    expect(parseConfigText(body("strategy: {name: sync}\n"), file).config.strategy).toEqual({ name: "sync", orders_ahead: "auto" });
  });

  it("diloco: its defaults, and its rules between keys with their lines", () => {
    const dl = (text: string) => body(text).replace("steps: 10\n", "steps: 200\n");
    const dl210 = (text: string) => body(text).replace("steps: 10\n", "steps: 210\n");
    expect(parseConfigText(dl("strategy: {name: diloco}\n"), file).config.strategy).toEqual({
      name: "diloco", inner_steps: 100, outer_optimizer: { name: "sgd", lr: 0.7, momentum: 0.9, nesterov: true }, fragments: 1, overlap_steps: 0, alpha: 0, codec: "none",
    });
    const message = messageOf(dl210("eval: {every: 30}\nstrategy: {name: diloco, inner_steps: 40, fragments: 4, overlap_steps: 10, codec: topk}\n"));
    expect(message).toContain("steps: counts inner steps under diloco and must be a multiple of strategy.inner_steps (40), found 210");
    expect(message).toContain("eval.every: counts inner steps under diloco and must be a multiple of strategy.inner_steps (40), found 30");
    expect(message).toContain("strategy.overlap_steps: expected an integer < inner_steps / fragments (10), found 10");
    expect(message).toContain("strategy.codec: topk cannot carry a pseudo-gradient");
    expect(message).not.toContain("found \"topk\" (a string)"); // the clearer rule replaces the schema's message
    expect(messageOf(dl("strategy: {name: diloco, inner_steps: 0}\n"))).toMatch(/strategy\.inner_steps: expected an integer >= 1/);
    expect(messageOf(dl("compression: {method: none}\nstrategy: {name: diloco, inner_steps: 5}\n"))).toMatch(/compression: is not used under strategy diloco: strategy\.codec carries the pseudo-gradient/);
  });

  it("parallel: absent by default, its defaults, and compression none under it", () => {
    expect("parallel" in parseConfigText(body(""), file).config).toBe(false);
    expect(parseConfigText(body("parallel:\n"), file).config.parallel).toBeUndefined();
    const { config } = parseConfigText(body("parallel: {pipeline_stages: 2}\n"), file);
    expect(config.parallel).toEqual({ pipeline_stages: 2, micro_batches: 4, schedule: "1f1b", activation_codec: "none" });
    expect(config.compression).toEqual({ method: "none" }); // the job default (powersgd) cannot carry a stage's gradient
    const given = parseConfigText(body("compression: {method: int8}\nparallel: {pipeline_stages: 1, micro_batches: 2, schedule: gpipe, activation_codec: bf16}\n"), file).config;
    expect(given.parallel).toEqual({ pipeline_stages: 1, micro_batches: 2, schedule: "gpipe", activation_codec: "bf16" });
    expect(given.compression).toEqual({ method: "int8" });
  });

  it("parallel: its own keys' errors with their lines", () => {
    expect(messageOf(body("parallel:\n  pipeline_stages: 0\n"))).toContain(`${file}:6:20: parallel.pipeline_stages: expected an integer >= 1 and <= 4096, found 0`);
    expect(messageOf(body("parallel:\n  micro_batches: 2\n"))).toContain(`${file}:5:1: parallel.pipeline_stages: missing required field`);
    expect(messageOf(body("parallel:\n  pipeline_stages: 2\n  schedule: zb\n"))).toContain(`${file}:7:13: parallel.schedule: expected one of gpipe | 1f1b, found "zb" (a string)`);
    expect(messageOf(body("parallel:\n  pipeline_stages: 2\n  activation_codec: int4\n"))).toContain(`${file}:7:21: parallel.activation_codec: expected one of none | fp16 | bf16 | int8, found "int4" (a string)`);
    expect(messageOf(body("parallel:\n  pipeline_stages: 2\n  stages: 2\n"))).toContain(`${file}:7:3: parallel.stages: unknown key "stages" in parallel; allowed keys: pipeline_stages, micro_batches, schedule, activation_codec`);
  });

  it("parallel: its rules between keys, with their lines", () => {
    // 3 local workers cannot form 2 stages of equal size.
    expect(messageOf(body("local_workers: 3\nparallel:\n  pipeline_stages: 2\n"))).toContain(
      `${file}:7:20: parallel.pipeline_stages: 2 does not divide the 3 workers (local_workers 3): every stage needs the same number of replicas; expected a divisor of 3 (1, 3)`,
    );
    // The default local_workers (2) counts too.
    expect(messageOf(body("parallel: {pipeline_stages: 3}\n"))).toContain(`parallel.pipeline_stages: 3 does not divide the 2 workers (local_workers, 2 by default)`);
    // --local N counts instead of local_workers.
    expect(parseConfigText(body("parallel: {pipeline_stages: 4}\n"), file, { localWorkers: 4 }).config.parallel?.pipeline_stages).toBe(4);
    expect(errorOf(body("local_workers: 4\nparallel: {pipeline_stages: 4}\n"), file, { localWorkers: 6 })).toContain("parallel.pipeline_stages: 4 does not divide the 6 workers (--local 6)");
    // With a providers list the count is known only at the start (checkPipelineWorkers).
    expect(parseConfigText(body("providers:\n  - address: 127.0.0.1:7070\nparallel: {pipeline_stages: 3}\n"), file).config.parallel?.pipeline_stages).toBe(3);
    // batch_size 8 over 4 workers in 2 stages: 2 chains of 4 samples, so at most 4 micro-batches.
    expect(messageOf(body("local_workers: 4\nparallel:\n  pipeline_stages: 2\n  micro_batches: 5\n"))).toContain(
      `${file}:8:18: parallel.micro_batches: expected at most batch_size / (workers / pipeline_stages) = 8 / (4 / 2) = 4: each of the 2 chains gets 4 samples a step and needs at least one per micro-batch, found 5`,
    );
    expect(parseConfigText(body("local_workers: 4\nparallel: {pipeline_stages: 2, micro_batches: 4}\n"), file).config.parallel?.micro_batches).toBe(4);
    expect(messageOf(body("batch_size: 3\n").replace("batch_size: 8\n", "") + "parallel: {pipeline_stages: 1}\n")).toContain(
      "parallel.micro_batches: expected at most batch_size / (workers / pipeline_stages) = 3 / (2 / 1) = 1: each of the 2 chains gets about 1 sample a step and needs at least one per micro-batch, found 4 (the default)",
    );
    // Not with diloco, and not with a codec that keeps state of the whole gradient.
    const withDiloco = messageOf(body("strategy: {name: diloco, inner_steps: 5}\nparallel:\n  pipeline_stages: 2\n"));
    expect(withDiloco).toContain(`${file}:7:3: parallel: pipeline with diloco is not supported yet`);
    expect(messageOf(body("compression:\n  method: powersgd\n  rank: 2\nparallel: {pipeline_stages: 2}\n"))).toContain(
      `${file}:6:11: compression.method: powersgd cannot be used with parallel: a stage's gradient is reduced per stage, among that stage's replicas only, and powersgd keeps low-rank factors and error feedback of the whole model's gradient; expected one of none | fp16 | bf16 | int8`,
    );
    expect(messageOf(body("compression: {method: topk}\nparallel: {pipeline_stages: 2}\n"))).toMatch(/compression\.method: topk cannot be used with parallel: a stage's gradient is reduced per stage/);
    // A section without its method is powersgd.
    expect(messageOf(body("compression: {rank: 2}\nparallel: {pipeline_stages: 2}\n"))).toContain(`${file}:5:14: compression: powersgd cannot be used with parallel`);
  });

  it("checkPipelineWorkers: the rules once the providers are counted", () => {
    const config = parseConfigText(body("providers:\n  - address: 127.0.0.1:7070\nparallel: {pipeline_stages: 2, micro_batches: 3}\n"), file).config;
    expect(() => checkPipelineWorkers(config, 4)).not.toThrow();
    expect(() => checkPipelineWorkers({ ...config, parallel: undefined }, 3)).not.toThrow();
    let err: unknown;
    try {
      checkPipelineWorkers(config, 3);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as ConfigError).exitCode).toBe(2);
    expect((err as Error).message).toBe(
      "parallel.pipeline_stages: 2 does not divide the 3 workers (counted when the job started): every stage needs the same number of replicas; expected a divisor of 3 (1, 3)",
    );
    // batch_size 8 over 6 workers in 2 stages: 3 chains of about 2 samples, fewer than 3 micro-batches.
    expect(() => checkPipelineWorkers(config, 6)).toThrow(/parallel\.micro_batches: expected at most batch_size \/ \(workers \/ pipeline_stages\) = 8 \/ \(6 \/ 2\) = 2/);
  });

  it("names an unknown strategy with its line and the known ones", () => {
    expect(messageOf(body("seed: 1\nstrategy:\n  name: gossip\n"))).toContain(
      `${file}:7:9: strategy.name: expected one of sync | diloco, found "gossip"`,
    );
    // A bare name is not a section: the message shows the form that is.
    expect(messageOf(body("strategy: sync\n"))).toContain(
      `${file}:5:11: strategy: expected a mapping with name: one of sync | diloco (e.g. {name: sync}), found "sync" (a string)`,
    );
    expect(messageOf(body("optimizer: adam\n"))).toContain(
      `optimizer: expected a mapping with name: one of sgd | adam | adamw (e.g. {name: sgd}), found "adam" (a string)`,
    );
  });

  it("rejects keys the chosen strategy does not have, with their line", () => {
    expect(messageOf(body("strategy:\n  name: sync\n  inner_steps: 50\n"))).toContain(
      `${file}:7:3: strategy.inner_steps: unknown key "inner_steps" in strategy (name: sync); allowed keys: name`,
    );
  });
});

describe("configs that would validate and then fail", () => {
  const dir = mkdtempSync(path.join(tmpdir(), "nimble-config-bounds-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, "nimble.yaml");
  const body = (section: string, task = PY_TASK) => `name: b\ntask: ${task}\nsteps: 10\nbatch_size: 8\n${section}`;
  const messageOf = (text: string) => errorOf(text, file);

  it("refuses infinite and not-a-number values, and seeds past what a worker can hold", () => {
    expect(messageOf(body("optimizer: {name: adam, lr: .inf}\n"))).toMatch(/nimble\.yaml:5:\d+: optimizer\.lr: /);
    expect(messageOf(body("optimizer: {name: sgd, momentum: .nan}\n"))).toMatch(/optimizer\.momentum/);
    expect(messageOf(body("seed: 1e300\n"))).toMatch(/nimble\.yaml:5:7: seed: expected an integer >= 0 and <= 9007199254740991/);
    expect(messageOf(body("faults: {heartbeat_s: .inf}\n"))).toMatch(/faults\.heartbeat_s/);
  });

  it("refuses task file names a provider would refuse", () => {
    for (const name of ["my task.py", "task.txt", "tâche.py"]) {
      const task = path.join(dir, name);
      writeFileSync(task, "x = 1\n");
      expect(messageOf(body("", task))).toMatch(/task: the task file's name .* must be 1 to 128 characters from A-Z a-z 0-9 \. _ - ending in \.py/);
    }
    // A task named like a module the worker imports is fine: providers keep it out of the worker's path.
    const torch = path.join(dir, "torch.py");
    writeFileSync(torch, "x = 1\n");
    expect(messageOf(body("", torch))).toBe("");
  });

  it("refuses a YAML bomb (aliases of aliases) without expanding it", () => {
    const levels = ["a: &a [x, x, x, x, x, x, x, x, x]"];
    for (let i = 1; i < 9; i++) levels.push(`${String.fromCharCode(97 + i)}: &${String.fromCharCode(97 + i)} [${Array(9).fill(`*${String.fromCharCode(96 + i)}`).join(", ")}]`);
    // 9^9 (387 million) strings if expanded.
    expect(messageOf(`${levels.join("\n")}\n${body("")}`)).toMatch(/nimble\.yaml:1:1: invalid YAML: .*alias/i);
  });

  it("reads only a regular file of config size: not a FIFO, not a huge file", async () => {
    const fifo = path.join(dir, "fifo.yaml");
    const { execFileSync } = await import("node:child_process");
    execFileSync("mkfifo", [fifo]);
    await expect(loadConfig(fifo)).rejects.toThrow(/fifo\.yaml: cannot read config: not a regular file/);
    const huge = path.join(dir, "huge.yaml");
    writeFileSync(huge, body(`# ${"x".repeat(2 * 1024 * 1024)}\n`));
    await expect(loadConfig(huge)).rejects.toThrow(/huge\.yaml: cannot read config: \d+ bytes is more than a config may have/);
  });
});

describe("--set overrides", () => {
  const dir = mkdtempSync(path.join(tmpdir(), "nimble-config-set-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, "nimble.yaml");
  writeFileSync(path.join(dir, "task.py"), "x = 1\n");
  const text = "name: s\ntask: task.py\nsteps: 10\n# a comment kept\nbatch_size: 8\noptimizer: {name: adam}\n";

  it("set fields before validation, typed as YAML, and the effective text keeps the file's comments", () => {
    const overrides = ["steps=25", "optimizer.lr=0.0005", "eval.every=5", "compression.method=none"].map(parseOverride);
    const loaded = parseConfigText(text, file, { overrides });
    expect(loaded.config.steps).toBe(25);
    expect(loaded.config.optimizer).toMatchObject({ name: "adam", lr: 0.0005 });
    expect(loaded.config.eval.every).toBe(5);
    expect(loaded.config.compression).toEqual({ method: "none" });
    expect(loaded.text).toMatch(/steps: 25\n# a comment kept\n/);
  });

  it("report a bad value under the flag that gave it, and a malformed flag", () => {
    const err = (() => {
      try {
        parseConfigText(text, file, { overrides: [parseOverride("steps=many"), parseOverride("optimizer.lr=-1")] });
      } catch (e) {
        return e as Error;
      }
    })();
    expect(err!.message.split("\n").slice(1)).toEqual([
      '  --set steps=many: steps: expected an integer >= 1, found "many" (a string)',
      "  --set optimizer.lr=-1: optimizer.lr: expected a number > 0, found -1",
    ]);
    expect(() => parseOverride("steps")).toThrow("--set steps: expected field=value, such as steps=500 or optimizer.lr=0.001");
    expect(() => parseOverride("=3")).toThrow(/expected field=value/);
  });
});

