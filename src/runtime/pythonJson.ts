import { execa } from "execa";
import { statSync } from "node:fs";
import path from "node:path";
import { forEachLine } from "./lines.js";

/**
 * Run `python -m MODULE ARGS` that prints one JSON line last (nimble_worker.bench,
 * nimble_worker.dryrun): its exit code, that line parsed (undefined when it is not JSON),
 * and the last lines of its stderr (each also handed to `onLog` as it comes).
 */
export async function runPythonJson(python: string, args: string[], env: Record<string, string>, onLog?: (line: string) => void): Promise<{ exitCode: number | undefined; last: unknown; stderrTail: string[] }> {
  // The environment extends this process's: these run on the user's own machine (CUDA_VISIBLE_DEVICES and the like apply).
  const child = execa(python, args, { env, reject: false, buffer: { stdout: true, stderr: false }, stderr: "pipe" });
  const stderrTail: string[] = [];
  forEachLine(child.stderr, (line) => {
    stderrTail.push(line);
    if (stderrTail.length > 10) stderrTail.shift();
    onLog?.(line);
  });
  const result = await child;
  let last: unknown;
  try {
    last = JSON.parse(String(result.stdout).trim().split("\n").pop() ?? "");
  } catch {
    last = undefined;
  }
  return { exitCode: result.exitCode, last, stderrTail };
}

/** `--task FILE`, or for a task folder (a package) its task.py and `--package FOLDER` (on the module path). */
export function taskArgs(taskPath: string): string[] {
  return statSync(taskPath).isDirectory() ? ["--task", path.join(taskPath, "task.py"), "--package", taskPath] : ["--task", taskPath];
}
