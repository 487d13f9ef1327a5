import { createHash } from "node:crypto";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { providerProfileSchema, type DeviceInfo, type ProviderProfile } from "../protocol/messages.js";
import { runHostBench } from "./hostBench.js";
import { cacheDir } from "./paths.js";

/** The cache file for a set of devices: other devices (a new GPU) mean another file, so a stale profile is never used. */
export function profilePath(devices: DeviceInfo[], torch: string, env: NodeJS.ProcessEnv = process.env): string {
  const key = createHash("sha256")
    .update(JSON.stringify({ devices: devices.map((d) => [d.id, d.kind, d.name, d.memory_bytes ?? 0]), torch }))
    .digest("hex")
    .slice(0, 16);
  return path.join(cacheDir(env), "profiles", `${key}.json`);
}

/** This host's profile: from the cache when its devices are unchanged, else measured and cached. */
export async function loadOrMeasureProfile(opts: {
  python: string;
  torch: string;
  devices: DeviceInfo[];
  onProgress?: (line: string) => void;
  env?: NodeJS.ProcessEnv;
}): Promise<{ profile: ProviderProfile; cached: boolean }> {
  const file = profilePath(opts.devices, opts.torch, opts.env);
  try {
    return { profile: providerProfileSchema.parse(JSON.parse(await readFile(file, "utf8"))), cached: true };
  } catch {
    // absent, unreadable or from an older format: measure again
  }
  opts.onProgress?.("measuring this host (first start with these devices; cached afterwards)");
  const bench = await runHostBench({ python: opts.python, onProgress: opts.onProgress });
  const profile: ProviderProfile = {
    device: bench.device,
    matmul_gflops_fp32: bench.matmul_gflops.fp32,
    memory_gbps: bench.memory_gbps,
    measured_at: new Date().toISOString(),
  };
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, JSON.stringify(profile, null, 2));
  return { profile, cached: false };
}
