import { Provider, type LogLevel, type ProviderEvent } from "../job/provider/index.js";
import { allowedKeys } from "../net/allowList.js";
import { defaultKeyFile, loadIdentity } from "../net/identity.js";
import { loadOrMeasureProfile } from "../runtime/profile.js";
import { probeHost, resolvePython } from "../runtime/python.js";
import { createProvideReporter } from "../ui/provideReporter.js";
import { verbosityFromFlags } from "../ui/reporter.js";

export interface ProvideCommandOptions {
  host: string;
  port: number;
  token?: string;
  /** Identity key file (default: the user's, made on first use). */
  key?: string;
  /** Key mode: coordinator keys to admit, given inline and in files (one per line). */
  allow?: string[];
  allowFile?: string[];
  python?: string;
  torch?: string;
  threads?: number;
  speed?: number;
  speedFile?: string;
  maxMicroBatch?: number;
  linkRate?: number;
  latency?: number;
  managed?: boolean;
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
    await provide(options, reporter.handle.bind(reporter), log);
  } finally {
    // Unmounts the dashboard (leaving its last frame) before an error is printed below it.
    reporter.close();
  }
}

async function provide(options: ProvideCommandOptions, onEvent: (event: ProviderEvent) => void, log: (line: string, level?: LogLevel) => void) {
  const python = await resolvePython({ python: options.python, torchSpec: options.torch, onProgress: (line) => log(line) });
  const { devices } = python.probe ?? (await probeHost(python.python));
  const profile =
    options.profile === false
      ? undefined
      : (await loadOrMeasureProfile({ python: python.python, torch: python.torchVersion, devices, onProgress: (line) => log(line) })).profile;
  const identity = await loadIdentity(options.key ?? defaultKeyFile(), { create: true });
  const allow = await allowedKeys(options.allow ?? [], options.allowFile ?? []);
  if (allow.length > 0 && (options.token ?? process.env.NIMBLE_TOKEN)) {
    log("--allow is given: coordinators are admitted by key only, and the token is not used", "warn");
  }
  const provider = new Provider({
    host: options.host,
    port: options.port,
    identity,
    allow,
    token: options.token ?? process.env.NIMBLE_TOKEN,
    python,
    devices,
    threads: options.threads,
    speed: options.speed,
    speedFile: options.speedFile,
    maxMicroBatch: options.maxMicroBatch,
    linkRate: options.linkRate,
    latencyMs: options.latency,
    profile,
    onEvent,
  });
  await provider.start();
  if (options.linkRate) log(`testing aid: uploads paced to ${(options.linkRate / 1e6).toFixed(2)} MB/s (--link-rate)`, "warn");
  if (options.latency) log(`testing aid: ${options.latency} ms one-way latency on this host's ring and control links (--latency)`, "warn");
  if (options.speed !== undefined && options.speed < 1) log(`testing aid: workers run at ${options.speed} of their speed (--speed)`, "warn");
  await new Promise<void>((resolve) => {
    const parent = process.ppid;
    const ignore = () => {};
    const watchParent = options.managed ? setInterval(() => process.ppid !== parent && stop(), 1000) : null;
    const stop = () => {
      if (watchParent) clearInterval(watchParent);
      process.off("SIGINT", options.managed ? ignore : stop);
      process.off("SIGTERM", stop);
      void provider.close().then(resolve);
    };
    // A managed (local) provider leaves Ctrl-C to its `nimble train`, which stops it after
    // writing a checkpoint; it also stops if that process dies (its parent changes).
    process.on("SIGINT", options.managed ? ignore : stop);
    process.on("SIGTERM", stop);
  });
}
