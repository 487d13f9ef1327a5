import { scaffold } from "../init/scaffold.js";

/** `nimble init [DIR]`: a commented nimble.yaml and a task.py that trains as it is. */
export async function initCommand(dir: string): Promise<void> {
  const written = await scaffold(dir);
  process.stdout.write(`${written.map((f) => `wrote ${f}`).join("\n")}\nNext: \`nimble train ${written[0]} --dry-run\`, then \`nimble train ${written[0]}\`.\n`);
}
