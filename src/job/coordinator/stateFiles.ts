import { JobFailed } from "./errors.js";

/** The files each kind of worker state may hold: nothing else a provider sends is written. */
export const STATE_FILES = {
  checkpoint: ["model.pt", "optimizer.pt", "schedule.pt", "data.json", "rng.pt", "meta.json", "compressor.pt", "strategy.pt"],
  compressor: ["compressor.pt"],
  final: ["model.safetensors"],
} as const;

/** The most bytes one state file may have (the control plane carries no more in one message). */
export const MAX_STATE_FILE_BYTES = 512 * 1024 * 1024;

/**
 * A provider's state files, checked before anything is written: only the names its kind
 * allows (a hostile provider must not get `task.py` or `config.yaml` written into the run,
 * which `--resume` would then run), each at most once and of a bounded size.
 */
export function checkStateFiles(kind: keyof typeof STATE_FILES, files: readonly { name: string; data: Uint8Array }[], from: string): void {
  const allowed: readonly string[] = STATE_FILES[kind];
  const seen = new Set<string>();
  for (const f of files) {
    if (!allowed.includes(f.name)) throw new JobFailed(`${from} sent a ${kind} state file named ${JSON.stringify(f.name.slice(0, 100))}; a ${kind} holds only ${allowed.join(", ")}`);
    if (seen.has(f.name)) throw new JobFailed(`${from} sent ${f.name} twice in one ${kind} state`);
    if (f.data.byteLength > MAX_STATE_FILE_BYTES) throw new JobFailed(`${from} sent a ${f.data.byteLength}-byte ${f.name}`);
    seen.add(f.name);
  }
  if (kind === "final" && !seen.has("model.safetensors")) throw new JobFailed(`${from} sent final weights without model.safetensors`);
}
