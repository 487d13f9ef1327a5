// WAN benchmark: Nimble over shaped internet-like links, side by side with torch DDP (gloo).
//
// Each of 4 providers (and the coordinator) runs in its own network namespace, joined to a
// bridge in a router namespace by a veth pair; each host's upload is shaped with tc tbf.
// Latency: the kernel's netem qdisc is missing here, so Nimble's providers delay frames
// themselves (`nimble provide --latency`, a testing aid: RTT/2 one way), and DDP's all-reduces
// get the same one-way latency added per ring hop in a comm hook: modelled, not measured, and
// not exact (see ddp_wan.py), so DDP figures at RTT > 0 are indicative.
// Without root (no namespaces), Nimble is shaped inside its transport (--link-rate) and DDP
// runs unshaped, which the output says; DDP figures are then not comparable.
//
//   sudo npm run bench:wan                      # the full matrix (about an hour here)
//   sudo npm run bench:wan -- --quick           # MNIST and char-LM at 100 Mbit/s, RTT 0
//   options: --models mnist,charlm --rates 1gbit,100mbit,20mbit --rtts 0,50,100
//            --systems nimble,nimble-psgd1,nimble-psgd4,ddp,ddp-psgd4 --steps N --out results
//            --cap-s S (stop a run S seconds after its first step and report how far it got)
//
// Writes results/wan.json (every run, every figure, per-step series), results/wan.md (the
// table) and results/wan.svg (validation loss against training time, 100 Mbit/s).
//
//   sudo npm run bench:wan -- --parts direct    # only the direct all-reduce's rows (~15 min)
//
// Parts of the matrix suite (--parts, default matrix): `matrix`, the table above; `direct`,
// the direct (butterfly) all-reduce against the ring: MNIST and char-LM at 100 Mbit/s, RTT 50
// and 100 ms, uncompressed and PowerSGD r4, each with collective ring, direct (and auto for
// PowerSGD): rows nimble-ring, nimble-direct, nimble-psgd4-ring, nimble-psgd4-direct and
// nimble-psgd4-auto, in namespaces prefixed "ndir-". A part's runs replace those of the same
// model, system, rate and RTT in results/wan.json; the others there are kept (and, without
// the matrix part, the file's heading).
//
//   sudo npm run bench:wan -- --suite diloco    # DiLoCo rows beside DDP and PowerSGD r4 (~40 min)
//
// The DiLoCo suite: char-LM, 600 inner steps, 4 providers at 100 Mbit/s, RTT 0 and 100 ms;
// the rows diloco-h50-int8, diloco-h50-int4, diloco-h100-int8, diloco-h100-int8-f4t2 (4
// fragments, overlap 2 steps), the references nimble-psgd4 and ddp (stopped --cap-s 400 s
// after their first step: they report how far they got), and diloco-nocomm, the same workers
// with communication switched off (one DiLoCo round of all the steps: a single sync at the
// very end, whose all-reduce time is taken out), run before and after the DiLoCo rows, against
// whose mean samples/s compute utilisation is defined. Writes results/wan-diloco.{json,md,svg}.
// --steps, --rtts, --systems (a system may come twice), --cap-s apply.
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { stringify } from "yaml";
import { arg, CLI as cli, flag, list, ROOT as root } from "./lib/args.mjs";
import { cannotMakeNamespaces, makeWan } from "./lib/netns.mjs";
import { dilocoMarkdown, lossChartSvg, markdownTable, summarise } from "./lib/wanReport.mjs";
import { killGroups } from "./lib/stats.mjs";


const quick = flag("quick");
const suite = arg("suite", "matrix");
if (!["matrix", "diloco"].includes(suite)) throw new Error(`--suite: expected matrix or diloco, found ${suite}`);
const WORKERS = 4;
const MODELS = {
  mnist: {
    task: path.join(root, "examples", "mnist", "task.py"),
    task_args: {},
    batch: 128,
    optimizer: { name: "adam", lr: 0.002 },
    eval: { every: 10, samples: 1000, batch_size: 500 },
    steps: 60,
    target_val_loss: 0.45,
  },
  charlm: {
    task: path.join(root, "examples", "brown-charlm", "task.py"),
    task_args: { block_size: 64, d_model: 192 },
    batch: 32,
    optimizer: { name: "adamw", lr: 0.003, weight_decay: 0.01 },
    eval: { every: 10, samples: 500, batch_size: 250 },
    steps: 50,
    target_val_loss: 2.55,
  },
};
// Nimble's rows pin `collective` (the matrix was measured on the ring; auto is the default).
const PSGD4 = { method: "powersgd", rank: 4, start_step: 4 };
const SYSTEMS = {
  nimble: { engine: "nimble", compression: { method: "none" }, collective: { algorithm: "ring" } },
  "nimble-psgd1": { engine: "nimble", compression: { method: "powersgd", rank: 1, start_step: 4 }, collective: { algorithm: "ring" } },
  "nimble-psgd4": { engine: "nimble", compression: PSGD4, collective: { algorithm: "ring" } },
  // The direct all-reduce (`collective: direct`), the coordinator's choice (`auto`), and the
  // ring rows they are held to, run beside them (the matrix's rows are kept as they were).
  "nimble-ring": { engine: "nimble", compression: { method: "none" }, collective: { algorithm: "ring" } },
  "nimble-psgd4-ring": { engine: "nimble", compression: PSGD4, collective: { algorithm: "ring" } },
  "nimble-direct": { engine: "nimble", compression: { method: "none" }, collective: { algorithm: "direct" } },
  "nimble-psgd4-direct": { engine: "nimble", compression: PSGD4, collective: { algorithm: "direct" } },
  "nimble-psgd4-auto": { engine: "nimble", compression: PSGD4, collective: { algorithm: "auto" } },
  // As shipped (collective auto, orders ahead auto), and the same with orders ahead off:
  // each step then waits one control round trip for its orders.
  "nimble-auto": { engine: "nimble", compression: { method: "none" }, collective: { algorithm: "auto" } },
  "nimble-inturn": { engine: "nimble", compression: { method: "none" }, collective: { algorithm: "auto" }, ordersAhead: "off" },
  ddp: { engine: "ddp", compression: { method: "none" } },
  "ddp-psgd4": { engine: "ddp", compression: { method: "powersgd", rank: 4, start_step: 4 } },
};
// DiLoCo rows (the suite below): a `strategy` instead of `compression` (which is a config
// error under diloco). `inner_steps: "steps"` is the run's whole length: one round.
const OUTER = { name: "sgd", lr: 0.7, momentum: 0.9, nesterov: true };
const diloco = (h, codec, fragments = 1, overlap = 0) => ({ engine: "nimble", strategy: { name: "diloco", inner_steps: h, outer_optimizer: OUTER, fragments, overlap_steps: overlap, alpha: 0, codec } });
Object.assign(SYSTEMS, {
  "diloco-h50-int8": diloco(50, "int8"),
  "diloco-h50-int4": diloco(50, "int4"),
  "diloco-h100-int8": diloco(100, "int8"),
  "diloco-h100-int8-f4t2": diloco(100, "int8", 4, 2),
  // The no-communication reference: the same workers, one sync at the very end (its time is
  // taken out of the reference's samples/s).
  "diloco-nocomm": { ...diloco("steps", "int8"), reference: true },
});
const MATRIX_SYSTEMS = ["nimble", "nimble-psgd1", "nimble-psgd4", "ddp", "ddp-psgd4"];
const SUITE = {
  model: "charlm",
  steps: 600,
  eval_every: 50,
  // DDP gets there at step 150 of 600 (2.18; 1.80 at 600), PowerSGD r4 and DiLoCo at 250-300.
  target_val_loss: 2.2,
  rates: "100mbit",
  rtts: "0,100",
  // The reference runs before and after the DiLoCo rows: its mean is what they are held to, its
  // spread says how much others' load on this machine moved it.
  systems: "diloco-nocomm,diloco-h50-int8,diloco-h50-int4,diloco-h100-int8,diloco-h100-int8-f4t2,diloco-nocomm,nimble-psgd4,ddp",
  cap_s: 400,
};
const inDiloco = suite === "diloco";
/** The direct all-reduce's part: its own rows, scenarios and namespaces. */
const DIRECT = {
  models: "mnist,charlm",
  rates: "100mbit",
  rtts: "50,100",
  systems: "nimble-ring,nimble-direct,nimble-psgd4-ring,nimble-psgd4-direct,nimble-psgd4-auto",
  prefix: "ndir-",
};
const parts = inDiloco ? ["diloco"] : list("parts", "matrix");
for (const p of parts) if (!inDiloco && !["matrix", "direct"].includes(p)) throw new Error(`--parts: expected matrix and/or direct, found ${p}`);
const onlyDirect = !inDiloco && parts.length === 1 && parts[0] === "direct";
const RATES = { "1gbit": 1e9, "100mbit": 100e6, "20mbit": 20e6 };
const models = inDiloco ? [SUITE.model] : list("models", onlyDirect ? DIRECT.models : "mnist,charlm");
const rates = list("rates", inDiloco ? SUITE.rates : onlyDirect ? DIRECT.rates : quick ? "100mbit" : "1gbit,100mbit,20mbit");
const rtts = list("rtts", inDiloco ? SUITE.rtts : onlyDirect ? DIRECT.rtts : quick ? "0" : "0,50,100").map(Number);
const systems = list("systems", inDiloco ? SUITE.systems : onlyDirect ? DIRECT.systems : MATRIX_SYSTEMS.join(","));
for (const m of models) if (!MODELS[m]) throw new Error(`--models: unknown model ${m} (known: ${Object.keys(MODELS).join(", ")})`);
for (const r of rates) if (!RATES[r]) throw new Error(`--rates: unknown rate ${r} (known: ${Object.keys(RATES).join(", ")})`);
for (const s of systems) if (!SYSTEMS[s]) throw new Error(`--systems: unknown system ${s} (known: ${Object.keys(SYSTEMS).join(", ")})`);
for (const r of rtts) if (!(r >= 0 && r <= 2000)) throw new Error(`--rtts: ${r} is not a round trip in ms`);
const stepsOverride = arg("steps", null);
const capArg = arg("cap-s", inDiloco ? String(SUITE.cap_s) : null);
const capS = capArg === null ? null : Number(capArg);
if (capS !== null && !(capS > 0)) throw new Error(`--cap-s: expected seconds > 0, found ${capArg}`);
const outBase = inDiloco ? "wan-diloco" : "wan";
/** A model's settings in this suite: the DiLoCo suite trains longer and evaluates every 50 steps. */
const modelFor = (model) => (inDiloco ? { ...MODELS[model], steps: SUITE.steps, eval: { ...MODELS[model].eval, every: SUITE.eval_every }, target_val_loss: SUITE.target_val_loss } : MODELS[model]);
const outDir = path.resolve(root, arg("out", "results"));
const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-wan-"));
const children = new Set();
const log = (line) => process.stderr.write(`${line}\n`);

// ---- where things run --------------------------------------------------------------------
const whyNot = cannotMakeNamespaces();
const shaping = whyNot ? "transport" : "netns+tbf";
if (whyNot) log(`bench:wan: cannot make network namespaces (${whyNot}): shaping inside Nimble's transport instead (--link-rate); DDP runs UNSHAPED on loopback and its figures are not comparable`);
const wan = whyNot ? null : makeWan(["c", ...Array.from({ length: WORKERS }, (_, i) => `p${i}`)], parts.includes("direct") ? { prefix: DIRECT.prefix } : {});
const coordHost = wan?.hosts[0];
const providerHosts = wan ? wan.hosts.slice(1) : Array.from({ length: WORKERS }, () => null);
const inHost = (host, cmd) => (host ? [...wan.exec(host), ...cmd] : cmd);

const killChildren = () => killGroups(children);
process.on("exit", () => {
  killChildren();
  rmSync(tmp, { recursive: true, force: true });
});

function spawnIn(host, cmd, opts = {}) {
  const [file, ...args] = inHost(host, cmd);
  // Own process group, so everything it starts (workers) can be killed together.
  const child = spawn(file, args, { detached: true, stdio: ["ignore", "pipe", "pipe"], ...opts });
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

function python() {
  if (process.env.NIMBLE_PYTHON) return process.env.NIMBLE_PYTHON;
  const out = execFileSync(process.execPath, [cli, "env", "--json"], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  return JSON.parse(out).python;
}
const PY = python();

// ---- providers -----------------------------------------------------------------------------
/** Start the 4 providers with a one-way latency of rttMs/2 (and transport pacing without netns). */
async function startProviders(rttMs, rateBits) {
  const started = providerHosts.map((host, i) => {
    const token = `wan-${i}`;
    const args = [process.execPath, cli, "provide", "--host", host ? host.ip : "127.0.0.1", "--port", host ? "7070" : "0", "--token", token, "--json", "--no-profile", "--threads", "1", "--python", PY];
    if (rttMs > 0) args.push("--latency", String(rttMs / 2));
    if (!host) args.push("--link-rate", `${rateBits / 1e6}Mbit`);
    const child = spawnIn(host, args);
    child.stderr.on("data", (d) => process.stderr.write(`[provider ${i}] ${d}`));
    return new Promise((resolve, reject) => {
      createInterface({ input: child.stdout }).on("line", (line) => {
        try {
          const e = JSON.parse(line);
          if (e.type === "listening") resolve({ child, address: e.url, token });
        } catch {
          // not an event
        }
      });
      child.once("exit", (code) => reject(new Error(`provider ${i} exited (${code}) before listening`)));
    });
  });
  return Promise.all(started);
}

async function stopProviders(providers) {
  for (const p of providers) {
    try {
      process.kill(-p.child.pid, "SIGTERM");
    } catch {
      // gone
    }
  }
  await Promise.all(providers.map((p) => (p.child.exitCode !== null ? null : new Promise((r) => p.child.once("exit", r)))));
}

// ---- one run -------------------------------------------------------------------------------
function wireBytes() {
  return wan ? providerHosts.reduce((s, h) => s + wan.txBytes(h), 0) : null;
}

function waitExit(child, what) {
  return new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal, what })));
}

const gcd = (a, b) => (b ? gcd(b, a % b) : a);

/** A DiLoCo system's strategy for a run of `steps` inner steps. */
function strategyFor(system, steps) {
  const s = SYSTEMS[system].strategy;
  return s.inner_steps === "steps" ? { ...s, inner_steps: steps } : s;
}

/**
 * Call `stop` (a clean SIGINT cancel for `nimble train`, SIGKILL for DDP's ranks) `capS`
 * seconds after the promise `started` (the run's first step) resolves; `capped.at` is set
 * when it did. Without --cap-s, nothing.
 */
function capAfter(started, stop) {
  const capped = { at: null, timer: null };
  if (capS === null) return capped;
  started.then(() => {
    capped.timer = setTimeout(() => {
      capped.at = capS;
      stop();
    }, capS * 1000);
  });
  return capped;
}

async function runNimble(name, m, system, providers, steps) {
  const strategy = SYSTEMS[system].strategy ? strategyFor(system, steps) : null;
  if (strategy && steps % strategy.inner_steps) throw new Error(`${system}: steps (${steps}) must be a multiple of inner_steps (${strategy.inner_steps})`);
  // Under diloco evaluation counts inner steps and must fall on a multiple of H.
  const every = strategy ? (m.eval.every * strategy.inner_steps) / gcd(m.eval.every, strategy.inner_steps) : m.eval.every;
  const config = {
    name,
    task: m.task,
    task_args: m.task_args,
    steps,
    batch_size: m.batch,
    seed: 0,
    optimizer: m.optimizer,
    lr_schedule: { name: "constant" },
    eval: strategy ? { ...m.eval, every: Math.min(every, steps) } : m.eval,
    balance: "equal", // as DDP splits: the comparison is of communication, not balancing
    leave_out_slow: false, // all links are equal here; keep all 4 workers, as DDP does
    ...(strategy ? { strategy } : { compression: SYSTEMS[system].compression }),
    ...(SYSTEMS[system].ordersAhead ? { strategy: { name: "sync", orders_ahead: SYSTEMS[system].ordersAhead } } : {}),
    ...(SYSTEMS[system].collective ? { collective: SYSTEMS[system].collective } : {}),
    providers: providers.map((p) => ({ address: p.address, token: p.token })),
    output: path.join(tmp, "runs"),
  };
  const file = path.join(tmp, `${name}.yaml`);
  writeFileSync(file, stringify(config));
  const child = spawnIn(coordHost, [process.execPath, cli, "train", file, "--json", "--python", PY]);
  let runDir = null;
  let runDirEarly = null;
  let stderr = "";
  let firstStep;
  const started = new Promise((r) => (firstStep = r));
  child.stderr.on("data", (d) => (stderr += d));
  const capped = capAfter(started, () => {
    try {
      process.kill(child.pid, "SIGINT"); // nimble train cancels cleanly: workers stop, metrics stay
    } catch {
      // gone
    }
  });
  createInterface({ input: child.stdout }).on("line", (line) => {
    try {
      const e = JSON.parse(line);
      if (e.type === "run") runDirEarly = e.run_dir;
      if (e.type === "step") firstStep();
      if (e.type === "done") {
        runDir = e.run_dir;
        clearTimeout(capped.timer); // finished: nothing to stop
      }
    } catch {
      // not an event
    }
  });
  const { code } = await waitExit(child);
  clearTimeout(capped.timer);
  firstStep();
  if (capped.at !== null && runDirEarly) runDir = runDirEarly;
  else if (code !== 0 || !runDir) throw new Error(`nimble train ${name} exited ${code}: ${stderr.trim().split("\n").slice(-5).join("\n")}`);
  const metrics = readFileSync(path.join(runDir, "metrics.jsonl"), "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l));
  if (capped.at !== null && metrics.length === 0) throw new Error(`nimble train ${name}: stopped at ${capS} s with no step recorded`);
  const series = metrics.map((r, i) => ({
    step: r.step,
    loss: r.loss,
    // Wall time between step ends (commit round trips included), less this step's evaluation.
    step_s: (i === 0 ? r.step_s : r.wall_s - metrics[i - 1].wall_s) - (r.eval_s ?? 0),
    compute_s: r.workers.map((w) => w.compute_s),
    comm_s: r.workers.map((w) => w.comm_s),
    allreduce_bytes: r.workers.map((w) => w.uncompressed_bytes),
    sent_bytes: r.workers.map((w) => w.bytes_sent),
    ...(r.eval ? { val_loss: r.eval.loss } : {}),
    ...(r.samples !== undefined ? { samples: r.samples } : {}),
    // A DiLoCo round covers several inner steps (one row per round); a sync row is one step.
    ...(r.diloco ? { inner_steps: r.step - (i === 0 ? -1 : metrics[i - 1].step), sync_comm_s: r.diloco.comm_s, hidden_s: r.diloco.hidden_s, round: r.diloco.round, fragment: r.diloco.fragment } : {}),
  }));
  const stepsDone = metrics[metrics.length - 1].step + 1;
  // The all-reduces' algorithm: what the coordinator chose and saw (summary.json's `collective`).
  let collective = null;
  try {
    collective = JSON.parse(readFileSync(path.join(runDir, "summary.json"), "utf8")).collective ?? null;
  } catch {
    // a capped run may have none
  }
  return { series, capped: capped.at !== null && stepsDone < steps, strategy, collective };
}

async function runDdp(name, m, system, rttMs, steps) {
  const comp = SYSTEMS[system].compression;
  const master = providerHosts[0] ? `${providerHosts[0].ip}:29500` : `127.0.0.1:${29500 + Math.floor(Math.random() * 1000)}`;
  const outs = [];
  const kids = [];
  const ranks = providerHosts.map((host, rank) => {
    const out = path.join(tmp, `${name}-rank${rank}.jsonl`);
    outs.push(out);
    const args = [PY, path.join(root, "scripts", "ddp_wan.py"), "--task", m.task, "--task-args", JSON.stringify(m.task_args), "--rank", String(rank), "--world", String(WORKERS), "--master", master,
      "--steps", String(steps), "--batch-size", String(m.batch), "--optimizer", m.optimizer.name, "--lr", String(m.optimizer.lr), "--weight-decay", String(m.optimizer.weight_decay ?? 0),
      "--compression", comp.method, "--psgd-rank", String(comp.rank ?? 4), "--start-step", String(comp.start_step ?? 0), "--latency-ms", String(rttMs / 2),
      "--eval-every", String(m.eval.every), "--eval-samples", String(m.eval.samples), "--eval-batch-size", String(m.eval.batch_size), "--threads", "1", "--out", out];
    if (host) args.push("--ifname", host.ifname);
    const child = spawnIn(host, args);
    kids.push(child);
    let stderr = "";
    child.stderr.on("data", (d) => (stderr += d));
    return waitExit(child, `rank ${rank}`).then((r) => ({ ...r, stderr }));
  });
  // The cap counts from rank 0's first step (its first line).
  const lines = (f) => {
    try {
      return readFileSync(f, "utf8").split("\n");
    } catch {
      return [];
    }
  };
  let poll = null;
  const started = new Promise((resolve) => {
    poll = setInterval(() => lines(outs[0]).length > 1 && resolve(), 500);
  });
  const capped = capAfter(started, () => {
    for (const k of kids) {
      try {
        process.kill(-k.pid, "SIGKILL");
      } catch {
        // gone
      }
    }
  });
  const exits = await Promise.all(ranks);
  clearInterval(poll);
  clearTimeout(capped.timer);
  if (capped.at === null) {
    for (const r of exits) {
      if (r.code !== 0) throw new Error(`ddp ${name} ${r.what} exited ${r.code ?? r.signal}: ${r.stderr.trim().split("\n").slice(-5).join("\n")}`);
    }
  }
  // Complete lines only (a rank stopped at the cap may have left half of one).
  const parse = (l) => {
    try {
      return JSON.parse(l);
    } catch {
      return null;
    }
  };
  let perRank = outs.map((f) => lines(f).map(parse).filter(Boolean));
  const n = Math.min(...perRank.map((rows) => rows.length));
  if (n === 0) throw new Error(`ddp ${name}: no step recorded`);
  perRank = perRank.map((rows) => rows.slice(0, n));
  const series = perRank[0].map((r0, t) => {
    const at = perRank.map((rows) => rows[t]);
    return {
      step: t,
      loss: at.reduce((s, r) => s + r.loss, 0) / at.length,
      step_s: Math.max(...at.map((r) => r.step_s)),
      compute_s: at.map((r) => r.compute_s),
      comm_s: at.map((r) => r.comm_s),
      allreduce_bytes: at.map((r) => r.allreduce_bytes),
      ...(r0.val_loss !== undefined ? { val_loss: r0.val_loss } : {}),
    };
  });
  return { series, capped: capped.at !== null && n < steps, strategy: null };
}

// ---- the matrix ----------------------------------------------------------------------------
const results = {
  date: new Date().toISOString(),
  machine: { cpu: os.cpus()[0]?.model ?? "unknown", cores: os.cpus().length, memory_gib: Math.round(os.totalmem() / 2 ** 30) },
  shaping,
  ...(whyNot ? { shaping_note: `no namespaces (${whyNot}): Nimble paced in its transport, DDP unshaped` } : {}),
  latency: "one-way RTT/2: Nimble's providers delay frames (nimble provide --latency); DDP's all-reduces are delayed 2(N-1) x RTT/2 each in a comm hook (modelled: DDP figures at RTT > 0 are indicative)",
  workers: WORKERS,
  // Others may share this machine: its load when the run started (and, at the end, when it ended).
  load_avg_start: os.loadavg().map((x) => Math.round(x * 100) / 100),
  models: Object.fromEntries(models.map((m) => [m, { ...modelFor(m), task: path.relative(root, MODELS[m].task) }])),
  ...(capS !== null ? { cap_s: capS, cap: `a run stops ${capS} s (wall time) after its first step and reports how far it got` } : {}),
  ...(inDiloco
    ? {
        suite: "diloco",
        reference: "diloco-nocomm",
        reference_note: "compute utilisation = samples/s (evaluation excluded) over diloco-nocomm's: the same 4 workers, one DiLoCo round of all the steps (a single sync at the very end), its training time less that sync's all-reduce (the least-waiting worker's communication)",
        target_val_loss: SUITE.target_val_loss,
        systems: Object.fromEntries(systems.map((s) => [s, SYSTEMS[s]])),
      }
    : {}),
  runs: [],
};
mkdirSync(outDir, { recursive: true });
// A part's runs replace the same scenarios' runs of an earlier results file; the others stay.
const earlier = (() => {
  const file = path.join(outDir, `${outBase}.json`);
  if (inDiloco || !existsSync(file)) return null;
  try {
    return JSON.parse(readFileSync(file, "utf8"));
  } catch {
    return null;
  }
})();
const runKey = (r) => `${r.model}|${r.system}|${r.rate}|${r.rtt_ms}`;
const planned = new Set(rtts.flatMap((rtt) => rates.flatMap((rate) => models.flatMap((model) => systems.map((system) => runKey({ model, system, rate, rtt_ms: rtt }))))));
const thisPart = { date: results.date, load_avg_start: results.load_avg_start };
if (earlier) {
  results.runs = (earlier.runs ?? []).filter((r) => !planned.has(runKey(r)));
  // Without the matrix, the file's heading (its date, machine, load) stays the matrix's.
  if (!parts.includes("matrix")) for (const k of ["date", "machine", "load_avg_start", "load_avg_end", "total_min"]) if (earlier[k] !== undefined) results[k] = earlier[k];
}
if (!inDiloco) {
  const before = earlier?.parts && !Array.isArray(earlier.parts) ? earlier.parts : {};
  results.parts = { ...before, ...Object.fromEntries(parts.map((p) => [p, thisPart])) };
}
const report = inDiloco ? dilocoMarkdown : markdownTable;
const save = () => {
  writeFileSync(path.join(outDir, `${outBase}.json`), JSON.stringify(results, null, 2) + "\n");
  writeFileSync(path.join(outDir, `${outBase}.md`), report(results));
  writeFileSync(path.join(outDir, `${outBase}.svg`), lossChartSvg(results, RATES["100mbit"], inDiloco ? rtts : 0));
};

process.on("unhandledRejection", (err) => {
  log(`bench:wan: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
const total = rtts.length * rates.length * models.length * systems.length;
let done = 0;
const t0 = Date.now();
try {
  const needProviders = systems.some((s) => SYSTEMS[s].engine === "nimble");
  for (const rtt of rtts) {
    // Latency is a provider option: new providers per RTT. With namespaces tc sets the rate,
    // so they serve every rate; without, they pace themselves and restart per rate too.
    let providers = needProviders && wan ? await startProviders(rtt, null) : [];
    try {
      for (const rate of rates) {
        wan?.shape(RATES[rate], wan.hosts);
        if (needProviders && !wan) providers = await startProviders(rtt, RATES[rate]);
        for (const model of models) {
          for (const system of systems) {
            const m = modelFor(model);
            const steps = Number(stepsOverride ?? (quick ? Math.round(m.steps / 2) : m.steps));
            const name = `wan-${model}-${system}-${rate}-rtt${rtt}`;
            log(`[${++done}/${total}] ${model} ${system} at ${rate}, RTT ${rtt} ms (${steps} steps; ${((Date.now() - t0) / 60000).toFixed(1)} min so far)`);
            const before = wireBytes();
            const load = Math.round(os.loadavg()[0] * 100) / 100; // others may share this machine
            const started = Date.now();
            let out;
            try {
              out = SYSTEMS[system].engine === "nimble" ? await runNimble(name, m, system, providers, steps) : await runDdp(name, m, system, rtt, steps);
            } catch (err) {
              log(`  failed: ${err.message}`);
              results.runs.push({ model, system, rate, rate_bits: RATES[rate], rtt_ms: rtt, steps, error: err.message });
              save();
              continue;
            }
            const wire = before === null ? null : wireBytes() - before;
            const extra = {
              ...(out.strategy ? { strategy: out.strategy, ...(SYSTEMS[system].reference ? { reference: true } : {}) } : {}),
              ...(SYSTEMS[system].collective ? { collective_config: SYSTEMS[system].collective.algorithm } : {}),
              ...(out.collective ? { collective: out.collective } : {}),
              part: parts.join(","),
              measured_at: new Date().toISOString(),
            };
            const capped = out.capped ? { capped: true, cap_s: capS } : {};
            const run = summarise({ model, system, rate, rate_bits: RATES[rate], rtt_ms: rtt, steps, ...capped, ...extra, load_avg_1min: load, wall_s: (Date.now() - started) / 1000, wire_bytes: wire, series: out.series, batch: m.batch, target: m.target_val_loss, compressed_from: SYSTEMS[system].compression?.start_step ?? 0 });
            results.runs.push(run);
            if (out.capped) log(`  stopped at the cap (${capS} s after the first step): ${run.inner_steps_done} of ${steps} steps`);
            log(`  ${run.steps_per_s.toFixed(2)} steps/s, ${run.samples_per_s?.toFixed(1)} samples/s, utilisation ${(run.compute_utilisation * 100).toFixed(0)}%` +
              (run.busbw_fraction !== null ? `, bus bandwidth ${(run.busbw_fraction * 100).toFixed(0)}% of link` : "") +
              (run.wire_bytes_per_step !== null ? `, ${(run.wire_bytes_per_step / 1e6).toFixed(2)} MB/step on the wire` : "") +
              `, target ${run.time_to_target_s === null ? "not reached" : `${run.time_to_target_s.toFixed(1)} s`}, final val loss ${run.final_val_loss?.toFixed(3)}`);
            save();
          }
        }
        if (!wan) await stopProviders(providers);
      }
    } finally {
      await stopProviders(providers);
    }
  }
} finally {
  killChildren();
  wan?.close();
}
Object.assign(parts.includes("matrix") || inDiloco ? results : thisPart, {
  total_min: Math.round((Date.now() - t0) / 6000) / 10,
  load_avg_end: os.loadavg().map((x) => Math.round(x * 100) / 100),
});
save();
process.stdout.write(report(results));
log(`wrote ${path.relative(root, path.join(outDir, `${outBase}.json`))}, ${outBase}.md, ${outBase}.svg (${((Date.now() - t0) / 60000).toFixed(1)} min)`);
