import { Provider, type ProviderEvent } from "../job/provider.js";
import { loadOrMeasureProfile } from "../runtime/profile.js";
import { probeHost, resolvePython } from "../runtime/python.js";

export interface ProvideCommandOptions {
  host: string;
  port: number;
  token?: string;
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
}

function printEvent(event: ProviderEvent, json: boolean) {
  if (json) {
    process.stdout.write(JSON.stringify(event) + "\n");
    return;
  }
  switch (event.type) {
    case "listening":
      process.stdout.write(
        [
          `nimble provider listening on ${event.url}`,
          `  token:   ${event.token}`,
          ...event.devices.map((d) => `  device:  ${d.id} (${d.name})`),
          `Give the address and token to the researcher (config \`providers:\`). Ctrl-C stops.`,
          "",
        ].join("\n"),
      );
      return;
    case "job":
      process.stdout.write(`job ${event.job} (${event.name}): ranks ${event.ranks.join(", ")} of ${event.world_size}\n`);
      return;
    case "job_end":
      process.stdout.write(`job ${event.job} ended: ${event.reason}\n`);
      return;
    case "log":
      process.stdout.write(`${event.line}\n`);
      return;
  }
}

/** `nimble provide`: run the provider agent until Ctrl-C or SIGTERM. */
export async function provideCommand(options: ProvideCommandOptions): Promise<void> {
  const json = Boolean(options.json);
  const python = await resolvePython({
    python: options.python,
    torchSpec: options.torch,
    onProgress: (line) => printEvent({ type: "log", line }, json),
  });
  const { devices } = python.probe ?? (await probeHost(python.python));
  const profile =
    options.profile === false
      ? undefined
      : (await loadOrMeasureProfile({ python: python.python, torch: python.torchVersion, devices, onProgress: (line) => printEvent({ type: "log", line }, json) })).profile;
  const provider = new Provider({
    host: options.host,
    port: options.port,
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
    onEvent: (event) => printEvent(event, json),
  });
  await provider.start();
  if (options.linkRate) printEvent({ type: "log", line: `testing aid: uploads paced to ${(options.linkRate / 1e6).toFixed(2)} MB/s (--link-rate)` }, json);
  if (options.latency) printEvent({ type: "log", line: `testing aid: ${options.latency} ms one-way latency on this host's ring and control links (--latency)` }, json);
  if (options.speed !== undefined && options.speed < 1) printEvent({ type: "log", line: `testing aid: workers run at ${options.speed} of their speed (--speed)` }, json);
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
