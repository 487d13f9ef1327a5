import { Provider, type LogLevel, type ProviderEvent, type ProviderOptions } from "../job/provider/index.js";
import { chooseDevices, loadProviderConfig, readTokenFile, workerLimits, type ProviderConfigFile } from "../job/provider/settings.js";
import { allowedKeys } from "../identity/allowList.js";
import { defaultKeyFile, loadIdentity } from "../identity/identity.js";
import { parseRate } from "../net/rateLimit.js";
import { loadOrMeasureProfile } from "../runtime/profile.js";
import { probeFromEnv, probeHost, resolvePython } from "../runtime/python.js";
import { cgroupSupport } from "../runtime/limits.js";
import { detectSandbox, pythonPrefixes, type SandboxSupport } from "../runtime/sandbox.js";
import { createProvideReporter } from "../ui/provideReporter.js";
import { verbosityFromFlags } from "../ui/reporter.js";

export interface ProvideCommandOptions {
  /** A provider config file holding any of the settings below (flags win). */
  config?: string;
  host?: string;
  port?: number;
  token?: string;
  tokenFile?: string;
  /** Identity key file (default: the user's, made on first use). */
  key?: string;
  /** Key mode: coordinator keys to admit, given inline and in files (one per line). */
  allow?: string[];
  allowFile?: string[];
  python?: string;
  torch?: string;
  threads?: number;
  devices?: string[];
  maxMemory?: string;
  maxProcesses?: number;
  maxJobHours?: number;
  /** commander's --no-job-requirements */
  jobRequirements?: boolean;
  /** commander's --no-sandbox: false runs jobs unconfined. */
  sandbox?: boolean;
  speed?: number;
  speedFile?: string;
  maxMicroBatch?: number;
  linkRate?: number;
  latency?: number;
  managed?: boolean;
  /** commander's --no-warm: false keeps no worker started ahead of the next job. */
  warm?: boolean;
  /** commander's --no-profile: false skips measuring (or loading) this host's profile. */
  profile?: boolean;
  json?: boolean;
  quiet?: boolean;
  verbose?: boolean;
}

/** `nimble provide`: run the provider agent until Ctrl-C or SIGTERM. */
export async function provideCommand(options: ProvideCommandOptions): Promise<void> {
  const reporter = await createProvideReporter({
    json: Boolean(options.json),
    verbosity: verbosityFromFlags(options),
  });
  const log = (line: string, level: LogLevel = "info") => reporter.handle({ type: "log", line, level });
  try {
    const provider = new Provider(await providerOptions(options, reporter.handle.bind(reporter), log));
    await provider.start();
    warnAboutAids(provider, log);
    await untilStopped(provider, Boolean(options.managed));
  } finally {
    // Unmounts the dashboard (leaving its last frame) before an error is printed below it.
    reporter.close();
  }
}

/** The provider's options: flags over the config file over defaults, each checked. */
async function providerOptions(options: ProvideCommandOptions, onEvent: (event: ProviderEvent) => void, log: (line: string, level?: LogLevel) => void): Promise<ProviderOptions> {
  const file: ProviderConfigFile = options.config ? await loadProviderConfig(options.config) : {};
  const testing = file.testing ?? {};
  // Independent checks run side by side: the interpreter's probe (a torch import) is the long one.
  const sandboxWanted = options.sandbox !== false && file.sandbox !== false;
  const sandbox = sandboxWanted ? settledLater(detectSandbox()) : null;
  const identityP = settledLater(loadIdentity(options.key ?? file.key ?? defaultKeyFile(), { create: true }));
  const limits = workerLimits(options.maxMemory ?? file.max_memory, options.maxProcesses ?? file.max_processes);
  const cgroupsP = settledLater(cgroupSupport(limits));
  // A local provider's `nimble train` probed this interpreter a moment ago and hands the probe down.
  const known = options.managed ? probeFromEnv() : undefined;
  const python = await resolvePython({ python: options.python ?? file.python, torchSpec: options.torch ?? file.torch, onProgress: (line) => log(line), known });
  const confinementP = settledLater(confinement(sandboxWanted, sandbox, python.python, log));
  const { devices: all } = python.probe ?? (await probeHost(python.python));
  const devices = chooseDevices(all, options.devices ?? file.devices);
  const profile =
    options.profile === false || file.profile === false
      ? undefined
      : (await loadOrMeasureProfile({ python: python.python, torch: python.torchVersion, devices, onProgress: (line) => log(line) })).profile;
  const identity = await identityP;
  const allow = await allowedKeys([...(options.allow ?? file.allow ?? [])], [...(options.allowFile ?? file.allow_file ?? [])]);
  const tokenFile = options.tokenFile ?? file.token_file;
  const token = options.token ?? (tokenFile ? await readTokenFile(tokenFile) : process.env.NIMBLE_TOKEN);
  if (options.token) log("--token is visible to every user of this host in the process list; prefer --token-file or NIMBLE_TOKEN", "warn");
  if (allow.length > 0 && token) log("--allow is given: coordinators are admitted by key only, and the token is not used", "warn");
  const cgroups = await cgroupsP;
  if (!cgroups.includes("pids") && process.getuid?.() === 0) {
    log("running as root without a writable pids cgroup: a job's processes are not bounded (RLIMIT_NPROC does not bind root); run the provider as an unprivileged user", "warn");
  }
  if (limits.maxMemoryBytes !== null && !cgroups.includes("memory")) log("no writable memory cgroup: --max-memory is enforced by the watchdog alone (every 0.5 s)", "info");
  return {
    host: options.host ?? file.host ?? "127.0.0.1",
    port: options.port ?? file.port ?? 7070,
    identity,
    allow,
    token,
    python,
    devices,
    threads: options.threads ?? file.threads,
    confinement: await confinementP,
    limits,
    maxJobHours: options.maxJobHours ?? file.max_job_hours,
    jobRequirements: options.jobRequirements !== false && file.job_requirements !== false,
    speed: options.speed ?? testing.speed,
    speedFile: options.speedFile ?? testing.speed_file,
    maxMicroBatch: options.maxMicroBatch ?? file.max_micro_batch,
    linkRate: options.linkRate ?? (typeof testing.link_rate === "string" ? parseRate(testing.link_rate) : testing.link_rate),
    latencyMs: options.latency ?? testing.latency_ms,
    profile,
    warm: options.warm !== false && file.warm !== false,
    onEvent,
  };
}

/** A promise awaited later: its failure is thrown there, not reported meanwhile as unhandled. */
function settledLater<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

/** Confine workers under bubblewrap, or say loudly that they are not. */
async function confinement(wanted: boolean, detected: Promise<SandboxSupport> | null, python: string, log: (line: string, level?: LogLevel) => void): Promise<ProviderOptions["confinement"]> {
  if (!wanted || !detected) {
    log("--no-sandbox: jobs run UNCONFINED, with every right of the user running this provider (its files, its network, its processes)", "warn");
    return { kind: "none" };
  }
  const support = await detected;
  if (support.kind === "none") {
    log(`cannot confine jobs: ${support.reason}; every job will be refused (install bubblewrap, or start with --no-sandbox to run them unconfined)`, "warn");
    return { kind: "unavailable", reason: support.reason! };
  }
  return { kind: "bwrap", support, readOnly: await pythonPrefixes(python) };
}

function warnAboutAids(provider: Provider, log: (line: string, level?: LogLevel) => void) {
  const o = provider.options;
  if (o.linkRate) log(`testing aid: uploads paced to ${(o.linkRate / 1e6).toFixed(2)} MB/s (--link-rate)`, "warn");
  if (o.latencyMs) log(`testing aid: ${o.latencyMs} ms one-way latency on this host's ring and control links (--latency)`, "warn");
  if (o.speed !== undefined && o.speed < 1) log(`testing aid: workers run at ${o.speed} of their speed (--speed)`, "warn");
}

function untilStopped(provider: Provider, managed: boolean): Promise<void> {
  return new Promise<void>((resolve) => {
    const parent = process.ppid;
    const ignore = () => {};
    const watchParent = managed ? setInterval(() => process.ppid !== parent && stop(), 1000) : null;
    const stop = () => {
      if (watchParent) clearInterval(watchParent);
      process.off("SIGINT", managed ? ignore : stop);
      process.off("SIGTERM", stop);
      void provider.close().then(resolve);
    };
    // A managed (local) provider leaves Ctrl-C to its `nimble train`, which stops it after
    // writing a checkpoint; it also stops if that process dies (its parent changes).
    process.on("SIGINT", managed ? ignore : stop);
    process.on("SIGTERM", stop);
  });
}
