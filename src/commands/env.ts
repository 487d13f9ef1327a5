import { resolvePython } from "../runtime/python.js";

/** `nimble env`: find or make the workers' Python environment and say where it is. */
export async function envCommand(options: { python?: string; torch?: string; json?: boolean }): Promise<void> {
  const env = await resolvePython({
    python: options.python,
    torchSpec: options.torch,
    onProgress: (line) => process.stderr.write(line + "\n"),
  });
  if (options.json) process.stdout.write(JSON.stringify(env) + "\n");
  else process.stdout.write(`python ${env.python}\n  python ${env.pythonVersion}, torch ${env.torchVersion} (${env.source})\n`);
}
