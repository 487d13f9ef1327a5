import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { execa } from "execa";
import { z } from "zod";
import { UserError, errorMessage } from "../errors.js";
import { deviceSchema, type DeviceInfo } from "../protocol/messages.js";
import { forEachLine } from "./lines.js";
import { cacheDir, PYTHON_RUNTIME_DIR } from "./paths.js";

/** What installs fast on the development machines; override with --torch / NIMBLE_TORCH. */
export const DEFAULT_TORCH_SPEC = "torch==2.13.0";

export interface PythonEnv {
  /** Interpreter the workers run under. */
  python: string;
  pythonVersion: string;
  torchVersion: string;
  /** Where it came from: --python, $NIMBLE_PYTHON, or the managed virtual environment. */
  source: "option" | "env" | "managed";
  /** The host's devices, when they were probed while resolving (not for a cached managed env). */
  probe?: HostProbe;
}

export interface ResolvePythonOptions {
  python?: string;
  torchSpec?: string;
  env?: NodeJS.ProcessEnv;
  /** Called with each line of progress while a managed environment is being made. */
  onProgress?: (line: string) => void;
  /** What a probe of the explicit interpreter found already (a local provider's parent probed it): not probed again. */
  known?: HostProbe;
}

const hostProbeSchema = z.object({ python: z.string(), torch: z.string(), devices: z.array(deviceSchema.passthrough()).min(1) });
export interface HostProbe {
  python: string;
  torch: string;
  devices: DeviceInfo[];
}

/**
 * Run `python -m nimble_worker.probe` (imports torch, lists devices): checks the interpreter can
 * run workers and says what they will run on, in one torch import.
 */
export async function probeHost(python: string): Promise<HostProbe> {
  const result = await execa(python, ["-m", "nimble_worker.probe"], {
    env: { PYTHONPATH: [PYTHON_RUNTIME_DIR, process.env.PYTHONPATH].filter(Boolean).join(":") },
    reject: false,
    timeout: 120_000,
  });
  let parsed: z.infer<typeof hostProbeSchema> | undefined;
  try {
    parsed = hostProbeSchema.parse(JSON.parse(String(result.stdout).trim().split("\n").pop() ?? ""));
  } catch {
    parsed = undefined;
  }
  if (result.exitCode !== 0 || result.failed || !parsed) {
    const tail = String(result.stderr || result.message || "").trim().split("\n").slice(-3).join("\n");
    throw new UserError(
      `The Python interpreter ${python} cannot run nimble's workers: ${tail}`,
      "Point --python (or NIMBLE_PYTHON) at an interpreter that has torch installed, or leave both unset to let nimble make its own environment.",
    );
  }
  return hostProbe(parsed);
}

/** The fields of a probe that nimble uses (the probe may print more). */
function hostProbe(parsed: z.infer<typeof hostProbeSchema>): HostProbe {
  const devices = parsed.devices.map((d) => ({ id: d.id, kind: d.kind, name: d.name, memory_bytes: d.memory_bytes, cores: d.cores }));
  return { python: parsed.python, torch: parsed.torch, devices };
}

/** A probe handed down in $NIMBLE_HOST_PROBE (by `nimble train` to its local providers), or undefined when absent or malformed. */
export function probeFromEnv(env: NodeJS.ProcessEnv = process.env): HostProbe | undefined {
  if (!env.NIMBLE_HOST_PROBE) return undefined;
  try {
    return hostProbe(hostProbeSchema.parse(JSON.parse(env.NIMBLE_HOST_PROBE)));
  } catch {
    return undefined; // probed again: the provider's own check
  }
}

/** The managed environment's folder: one per torch requirement, so changing it makes a new one. */
export function managedEnvDir(torchSpec: string, env: NodeJS.ProcessEnv = process.env): string {
  const slug = createHash("sha256").update(torchSpec).digest("hex").slice(0, 10);
  return path.join(cacheDir(env), "python", `env-${slug}`);
}

function venvPython(dir: string): string {
  return process.platform === "win32" ? path.join(dir, "Scripts", "python.exe") : path.join(dir, "bin", "python");
}

interface Marker {
  torchSpec: string;
  python: string;
  torch: string;
}

/**
 * Find or make the interpreter the workers use: --python, then $NIMBLE_PYTHON, then a virtual
 * environment under the user's cache with torch installed on first use. A managed environment
 * counts as ready only once its marker file is written, so an interrupted install is redone.
 */
export async function resolvePython(opts: ResolvePythonOptions = {}): Promise<PythonEnv> {
  const env = opts.env ?? process.env;
  const explicit = opts.python ?? env.NIMBLE_PYTHON;
  if (explicit) {
    const info = opts.known ?? (await probeHost(explicit));
    return { python: explicit, pythonVersion: info.python, torchVersion: info.torch, source: opts.python ? "option" : "env", probe: info };
  }
  const torchSpec = opts.torchSpec ?? env.NIMBLE_TORCH ?? DEFAULT_TORCH_SPEC;
  const dir = managedEnvDir(torchSpec, env);
  const markerPath = path.join(dir, "nimble-env.json");
  if (existsSync(markerPath) && existsSync(venvPython(dir))) {
    try {
      const marker = JSON.parse(await readFile(markerPath, "utf8")) as Marker;
      if (marker.torchSpec === torchSpec) {
        return { python: venvPython(dir), pythonVersion: marker.python, torchVersion: marker.torch, source: "managed" };
      }
    } catch {
      // unreadable marker: rebuild below
    }
  }
  await provision(dir, torchSpec, env, opts.onProgress ?? (() => {}));
  const info = await probeHost(venvPython(dir));
  const marker: Marker = { torchSpec, python: info.python, torch: info.torch };
  await writeFile(markerPath, JSON.stringify(marker, null, 2));
  return { python: venvPython(dir), pythonVersion: info.python, torchVersion: info.torch, source: "managed", probe: info };
}

async function provision(dir: string, torchSpec: string, env: NodeJS.ProcessEnv, progress: (line: string) => void) {
  const basePython = env.NIMBLE_BASE_PYTHON ?? "python3";
  progress(`Making a Python environment for the workers in ${dir} (first run only)`);
  await rm(dir, { recursive: true, force: true });
  await mkdir(path.dirname(dir), { recursive: true });
  await runStep(basePython, ["-m", "venv", dir], `create a virtual environment with ${basePython}`, progress,
    `Install Python 3.9+ with venv (Debian: apt-get install python3-venv), set NIMBLE_BASE_PYTHON, or pass --python.`);
  progress(`Installing ${torchSpec} and numpy (set NIMBLE_TORCH or --torch to change the requirement)`);
  await runStep(venvPython(dir), ["-m", "pip", "install", "--progress-bar", "off", torchSpec, "numpy"],
    `install ${torchSpec}`, progress,
    `Check the requirement (NIMBLE_TORCH / --torch) and that pip can reach its index, or pass --python with an interpreter that already has torch.`);
}

async function runStep(cmd: string, args: string[], what: string, progress: (line: string) => void, hint: string) {
  const tail: string[] = [];
  try {
    const child = execa(cmd, args, { all: true, buffer: false, reject: true });
    forEachLine(child.all, (line) => {
      tail.push(line);
      if (tail.length > 15) tail.shift();
      progress(`  ${line}`);
    });
    await child;
  } catch (err) {
    throw new UserError(`Could not ${what}: ${tail.slice(-8).join("\n") || errorMessage(err)}`, hint);
  }
}
