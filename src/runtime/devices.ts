import { execa } from "execa";
import { z } from "zod";
import { UserError } from "../errors.js";
import { deviceSchema, type DeviceInfo } from "../protocol/messages.js";
import { PYTHON_RUNTIME_DIR } from "./paths.js";

const probeSchema = z.object({ python: z.string(), torch: z.string(), devices: z.array(deviceSchema.passthrough()).min(1) });

/** Ask torch which devices this host has (`python -m nimble_worker.probe`): one worker each. */
export async function probeDevices(python: string): Promise<DeviceInfo[]> {
  const result = await execa(python, ["-m", "nimble_worker.probe"], {
    env: { PYTHONPATH: [PYTHON_RUNTIME_DIR, process.env.PYTHONPATH].filter(Boolean).join(":") },
    reject: false,
    timeout: 120_000,
  });
  const last = String(result.stdout).trim().split("\n").pop() ?? "";
  let parsed: z.infer<typeof probeSchema> | undefined;
  try {
    parsed = probeSchema.parse(JSON.parse(last));
  } catch {
    parsed = undefined;
  }
  if (result.exitCode !== 0 || !parsed) {
    throw new UserError(`Could not list this host's devices with ${python}: ${String(result.stderr).trim().split("\n").slice(-3).join("\n")}`);
  }
  return parsed.devices.map((d) => ({ id: d.id, kind: d.kind, name: d.name, memory_bytes: d.memory_bytes, cores: d.cores }));
}
