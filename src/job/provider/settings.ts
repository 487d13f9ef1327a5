/**
 * Every setting of `nimble provide`, from its flags and from a provider config file
 * (`--config provider.yaml`, validated like a job config, with line numbers). A flag
 * given on the command line wins over the file.
 */
import { readFile, stat } from "node:fs/promises";
import { z } from "zod";
import { readConfigText, validateYaml } from "../../config/load.js";
import { errorMessage, UserError } from "../../errors.js";
import type { DeviceInfo } from "../../protocol/messages.js";
import { DEFAULT_LIMITS, parseSize, type WorkerLimits } from "../../runtime/limits.js";

/** The longest job an owner may allow: timers hold at most 2^31 ms (24.8 days). */
export const MAX_JOB_HOURS = 500;

const size = z.union([z.number().int().min(64 * 1024 * 1024), z.string().max(32)]);

export const providerConfigSchema = z
  .object({
    host: z.string().min(1).max(256).optional(),
    port: z.number().int().min(0).max(65535).optional(),
    /** Identity key file (default: the user's). */
    key: z.string().min(1).optional(),
    /** Key mode: coordinator keys admitted, inline and in files. */
    allow: z.array(z.string().max(128)).optional(),
    allow_file: z.array(z.string().min(1)).optional(),
    /** Token mode: a file holding the token (nothing secret in argv or in this file). */
    token_file: z.string().min(1).optional(),
    python: z.string().min(1).optional(),
    torch: z.string().min(1).optional(),
    threads: z.number().int().min(1).max(1024).optional(),
    max_micro_batch: z.number().int().min(1).optional(),
    profile: z.boolean().optional(),
    /** Which devices to offer: ids (`cpu`, `cuda:1`) or GPU indices. */
    devices: z.array(z.union([z.string().max(64), z.number().int().min(0)])).min(1).optional(),
    max_memory: size.optional(),
    max_processes: z.number().int().min(64).max(1_000_000).optional(),
    max_job_hours: z.number().positive().max(MAX_JOB_HOURS).optional(),
    /** false: refuse jobs that bring requirements of their own (nothing is installed per job). */
    job_requirements: z.boolean().optional(),
    /** false: keep no worker started (torch imported) ahead of the next job. */
    warm: z.boolean().optional(),
    /** false: run jobs unconfined (loudly warned). */
    sandbox: z.boolean().optional(),
    testing: z
      .object({
        speed: z.number().gt(0).max(1).optional(),
        speed_file: z.string().min(1).optional(),
        latency_ms: z.number().min(0).max(60_000).optional(),
        link_rate: z.union([z.number().positive(), z.string().max(32)]).optional(),
      })
      .strict()
      .optional(),
  })
  .strict();

export type ProviderConfigFile = z.output<typeof providerConfigSchema>;

export async function loadProviderConfig(file: string): Promise<ProviderConfigFile> {
  return validateYaml(providerConfigSchema, await readConfigText(file, "pass the path of a YAML provider config"), file);
}

/** The token from `--token-file`: its first line; a file others can read is refused. */
export async function readTokenFile(file: string): Promise<string> {
  let text: string;
  try {
    const info = await stat(file);
    if (!info.isFile()) throw new Error("not a regular file");
    if ((info.mode & 0o077) !== 0) throw new UserError(`Token file ${file} can be read by others (mode ${(info.mode & 0o777).toString(8)})`, `Run \`chmod 600 ${file}\`.`);
    if (info.size > 4096) throw new Error(`${info.size} bytes is more than a token`);
    text = await readFile(file, "utf8");
  } catch (err) {
    if (err instanceof UserError) throw err;
    throw new UserError(`Cannot read --token-file ${file}: ${errorMessage(err)}`);
  }
  const token = text.split("\n")[0]!.trim();
  if (token.length < 8) throw new UserError(`Token file ${file} holds no token of at least 8 characters`);
  return token;
}

/** The devices to offer: `--devices cpu`, `--devices cuda:0,cuda:2` or GPU indices `--devices 0,2`. */
export function chooseDevices(all: DeviceInfo[], wanted: (string | number)[] | undefined): DeviceInfo[] {
  if (!wanted) return all;
  const ids = wanted.flatMap((w) => String(w).split(",")).map((w) => w.trim()).filter(Boolean).map((w) => (/^\d+$/.test(w) ? `cuda:${w}` : w));
  const unknown = ids.filter((id) => !all.some((d) => d.id === id));
  if (unknown.length > 0) throw new UserError(`--devices names ${unknown.join(", ")}, which this host does not have`, `It has ${all.map((d) => d.id).join(", ")}.`);
  return all.filter((d) => ids.includes(d.id));
}

/** The owner's limits on each worker, from `--max-memory` and `--max-processes`. */
export function workerLimits(maxMemory: string | number | undefined, maxProcesses: number | undefined): WorkerLimits {
  let maxMemoryBytes: number | null = null;
  if (maxMemory !== undefined) {
    try {
      maxMemoryBytes = typeof maxMemory === "number" ? maxMemory : parseSize(maxMemory);
    } catch (err) {
      throw new UserError(`--max-memory: ${errorMessage(err)}`);
    }
  }
  return { ...DEFAULT_LIMITS, maxMemoryBytes, ...(maxProcesses ? { maxProcesses } : {}) };
}
