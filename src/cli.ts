#!/usr/bin/env node
import { Command, InvalidArgumentError, Option } from "commander";
import { UserError } from "./errors.js";
// Commands load when run: `nimble train` does not wait for the live views or the report's modules of the others.
const commands = {
  train: () => import("./commands/train.js"),
  provide: () => import("./commands/provide.js"),
  bench: () => import("./commands/bench.js"),
  runs: () => import("./commands/runs.js"),
  report: () => import("./commands/report.js"),
  init: () => import("./commands/init.js"),
  id: () => import("./commands/id.js"),
  env: () => import("./commands/env.js"),
};
import { MAX_JOB_HOURS } from "./job/provider/settings.js";
import { parseRate } from "./net/rateLimit.js";
import { parseSize } from "./runtime/limits.js";

function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError("expected a whole number >= 1");
  return n;
}

function fraction(value: string): number {
  const n = Number(value);
  if (!(n > 0 && n <= 1)) throw new InvalidArgumentError("expected a number in (0, 1]");
  return n;
}

function rate(value: string): number {
  try {
    return parseRate(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function size(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function milliseconds(value: string): number {
  const m = /^\s*([0-9]*\.?[0-9]+)\s*(ms)?\s*$/i.exec(value);
  const n = m ? Number(m[1]) : NaN;
  if (!(n >= 0 && n <= 60_000)) throw new InvalidArgumentError("expected milliseconds from 0 to 60000 (e.g. 25 or 25ms)");
  return n;
}

function hours(value: string): number {
  const n = Number(value);
  if (!(n > 0 && n <= MAX_JOB_HOURS)) throw new InvalidArgumentError(`expected hours above 0 and at most ${MAX_JOB_HOURS}`);
  return n;
}

function port(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError("expected a port number 0-65535");
  return n;
}

const program = new Command()
  .name("nimble")
  .description("Train one PyTorch model across many GPU hosts over ordinary internet links")
  .version("0.1.0")
  .showHelpAfterError();

program
  .command("train")
  .description("run a training job from a YAML config, on the providers it names or on local ones")
  .argument("[config]", "job config (YAML); not with --resume")
  .option("--resume <run_dir>", "continue a run directory from its newest intact checkpoint (with --set steps=N, past its end)")
  .option("--dry-run", "validate, build the datasets and model and run one step on one local worker, then exit (no providers, no run folder)")
  .option("--set <field=value>", "override a config field, e.g. --set steps=500 --set optimizer.lr=0.001 (repeatable)", (v: string, all: string[] = []) => [...all, v])
  .option("--local <n>", "number of local providers to start (overrides local_workers)", positiveInt)
  .option("--python <path>", "interpreter with torch for local workers (default: $NIMBLE_PYTHON or a managed environment)")
  .option("--torch <requirement>", "torch requirement for the managed environment (default: $NIMBLE_TORCH or torch==2.13.0)")
  .option("--key <file>", "your identity key file (default: the user's, made on first use; `nimble id` prints it)")
  .option("--no-sandbox", "run the local providers' jobs UNCONFINED (no bubblewrap)")
  .option("--json", "print one JSON event per line instead of the live view")
  .option("-q, --quiet", "no live view: only warnings, errors and the final summary (train.log keeps everything)")
  .option("-v, --verbose", "also every step and detail such as rebalanced shares")
  .action(async (config: string | undefined, opts) => (await commands.train()).trainCommand(config, opts));

program
  .command("provide")
  .description("make this host a training provider: listen for jobs and run their workers")
  .option("--config <file>", "a provider config file (YAML) with any of the settings below; flags win")
  .option("--host <address>", "address to listen on (use 0.0.0.0 to accept other hosts; default 127.0.0.1)")
  .option("--port <port>", "port to listen on (0 picks a free one; default 7070)", port)
  .option("--python <path>", "interpreter with torch for the workers (default: $NIMBLE_PYTHON or a managed environment)")
  .option("--torch <requirement>", "torch requirement for the managed environment")
  .option("--threads <n>", "torch threads per worker", positiveInt)
  .option("--max-micro-batch <n>", "largest micro-batch a worker runs at once (larger shares accumulate)", positiveInt)
  .option("--no-profile", "do not measure or advertise this host's profile")
  .option("--no-warm", "keep no worker started (torch imported) ahead of the next job; each job starts its workers cold")
  .option("--json", "print one JSON event per line")
  .option("-q, --quiet", "only the listening block, jobs starting and ending, warnings and errors; no live view")
  .option("-v, --verbose", "also every stats update and debug lines (connections, ring links)")
  .addOption(new Option("--allow <key...>", "key mode: admit only coordinators with these keys (see `nimble id`); no token is used").helpGroup("Who may start jobs:"))
  .addOption(new Option("--allow-file <file...>", "key mode: admit the keys listed in these files, one per line (# comments allowed)").helpGroup("Who may start jobs:"))
  .addOption(new Option("--token-file <file>", "token mode: read the token from this file (mode 0600; nothing secret in argv)").helpGroup("Who may start jobs:"))
  .addOption(new Option("--token <token>", "token mode: the token itself (visible in the process list: prefer --token-file or $NIMBLE_TOKEN; default a random one, printed)").helpGroup("Who may start jobs:"))
  .addOption(new Option("--key <file>", "this provider's identity key file (default: the user's, made on first use)").helpGroup("Who may start jobs:"))
  .addOption(new Option("--devices <ids...>", "offer only these devices: cpu, cuda:N or GPU indices (e.g. --devices 0,2)").helpGroup("The owner's limits:"))
  .addOption(new Option("--max-memory <size>", "resident memory per worker process, e.g. 8GB (a cgroup where writable, else a watchdog; on GPUs also torch's share of the device)").helpGroup("The owner's limits:"))
  .addOption(new Option("--max-processes <n>", "processes and threads per worker (default 512)").argParser(positiveInt).helpGroup("The owner's limits:"))
  .addOption(new Option("--max-job-hours <hours>", "end a job that runs longer than this").argParser(hours).helpGroup("The owner's limits:"))
  .addOption(new Option("--no-job-requirements", "refuse jobs that bring pip requirements of their own (nothing is installed per job)").helpGroup("The owner's limits:"))
  .addOption(new Option("--no-sandbox", "run jobs UNCONFINED (no bubblewrap): they can do anything this user can").helpGroup("The owner's limits:"))
  .addOption(new Option("--speed <fraction>", "run workers at this fraction of their speed (0-1]").argParser(fraction).helpGroup("Testing aids:"))
  .addOption(new Option("--speed-file <path>", "re-read the speed fraction from this file every 0.5 s, mid-run too").helpGroup("Testing aids:"))
  .addOption(new Option("--link-rate <rate>", "pace this host's uploads to a rate in bytes/s or with a unit (20Mbit, 2.5MB)").argParser(rate).helpGroup("Testing aids:"))
  .addOption(new Option("--latency <ms>", "delay what this host receives, and its messages to the coordinator, by a one-way latency").argParser(milliseconds).helpGroup("Testing aids:"))
  // Set by `nimble train` for the local providers it starts: they ignore Ctrl-C (the
  // coordinator stops them after its last checkpoint) and exit if it dies.
  .addOption(new Option("--managed", "run as a local provider of the parent nimble train").hideHelp())
  .action(async (opts) => (await commands.provide()).provideCommand(opts));

program
  .command("bench")
  .description("measure this host: devices, matmul and memory throughput, the task's own samples/s, links to providers")
  .argument("[config]", "job config: also measure its task's training throughput")
  .option("--peer <address...>", "measure latency and throughput to these providers (host:port)")
  .option("--token <token>", "token for --peer providers (default: $NIMBLE_TOKEN)")
  .option("--key <file>", "your identity key file, for --peer providers that admit keys")
  .option("--python <path>", "interpreter with torch (default: $NIMBLE_PYTHON or a managed environment)")
  .option("--torch <requirement>", "torch requirement for the managed environment")
  .option("--device <id>", "device to measure (default: the first)")
  .option("--quick", "short measurements (less accurate)")
  .option("--max-memory <size>", "with a config that has parallel: each worker's memory limit the stage plan assumes, e.g. 8GB (as provide's --max-memory; default none)", size)
  .option("--json", "print JSON")
  .action(async (config: string | undefined, opts) => (await commands.bench()).benchCommand(config, opts));

const runs = program
  .command("runs")
  .description("list past runs in the output folder with their key figures")
  .option("--output <dir>", "folder the runs are in (the config's `output`; default runs)")
  .option("--json", "print JSON")
  .action(async (opts) => (await commands.runs()).runsCommand(opts));

runs
  .command("show")
  .description("print one run's summary: figures, workers, faults, checkpoints")
  .argument("<run>", "run directory, or a run's folder name (or the start of one) in --output")
  .option("--output <dir>", "folder the runs are in (the config's `output`; default runs)")
  .option("--json", "print JSON")
  // `runs --output X show RUN` and `runs show RUN --output X` both work: commander gives
  // options after the subcommand name to whichever command defines them first.
  .action(async (run: string, opts) => (await commands.runs()).runsShowCommand(run, { ...runs.opts(), ...Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined)) }));

program
  .command("export")
  .description("write a run's final weights (model.safetensors, format pt) and a config.json naming what made them")
  .argument("<run>", "run directory, or a run's folder name (or the start of one) in --output")
  .requiredOption("--to <dir>", "folder to write them in (made if missing; not over an earlier export)")
  .option("--output <dir>", "folder the runs are in (the config's `output`; default runs)")
  .option("--json", "print JSON")
  .action(async (run: string, opts) => (await commands.runs()).exportCommand(run, opts));

program
  .command("report")
  .description("write a self-contained HTML report of a run: figures, workers, faults and charts")
  .argument("<run>", "run directory, or a run's folder name (or the start of one) in --output")
  .option("--out <file>", "HTML file to write (default: report.html in the run directory)")
  .option("--screenshot <png>", "also render the report to a full-page PNG with headless Chromium")
  .option("--output <dir>", "folder the runs are in (the config's `output`; default runs)")
  .option("--json", "print one JSON object: {report, screenshot?, data}")
  .action(async (run: string, opts) => (await commands.report()).reportCommand(run, opts));

program
  .command("init")
  .description("write a commented job config and a task skeleton that trains as it is")
  .argument("[dir]", "folder to write them in (made if missing)", ".")
  .action(async (dir: string) => (await commands.init()).initCommand(dir));

program
  .command("id")
  .description("print your identity key (made on first use): give it to providers' owners for --allow")
  .option("--key <file>", "another key file (made if missing)")
  .option("--json", "print JSON")
  .action(async (opts) => (await commands.id()).idCommand(opts));

program
  .command("env")
  .description("find or make the Python environment workers run in, and print it")
  .option("--python <path>", "check this interpreter instead")
  .option("--torch <requirement>", "torch requirement for the managed environment")
  .option("--json", "print JSON")
  .action(async (opts) => (await commands.env()).envCommand(opts));

/** The one place errors become exit codes: user errors print their hint, anything else its stack. */
program.parseAsync(process.argv).then(
  () => process.exit(process.exitCode ?? 0),
  (err: unknown) => {
    if (err instanceof UserError) {
      process.stderr.write(`error: ${err.message}\n`);
      if (err.hint) process.stderr.write(`hint: ${err.hint}\n`);
      process.exit(err.exitCode);
    }
    process.stderr.write(`nimble: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);
