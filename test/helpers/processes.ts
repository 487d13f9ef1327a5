import { execa, type Options, type ResultPromise } from "execa";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll } from "vitest";
import { forEachLine } from "../../src/runtime/lines.js";
import { resolvePython } from "../../src/runtime/python.js";
import { CLI_PATH } from "../../src/runtime/paths.js";

export const REPO_ROOT = path.resolve(import.meta.dirname, "..", "..");

/**
 * Every process a test starts goes through here, and all of them (with their process
 * groups: providers start workers) are killed when the file's tests end, pass or fail.
 */
const started: ResultPromise[] = [];

function killGroup(pid: number | undefined) {
  if (!pid) return;
  for (const target of [-pid, pid]) {
    try {
      process.kill(target, "SIGKILL");
    } catch {
      // gone
    }
  }
}

afterAll(async () => {
  for (const child of started) {
    if (child.exitCode === null) killGroup(child.pid);
  }
  await Promise.all(started.map((c) => c.catch(() => undefined)));
  started.length = 0;
});

let pythonPromise: Promise<string> | null = null;
/** The interpreter with torch the e2e tests use: $NIMBLE_PYTHON or the managed environment. */
export function testPython(): Promise<string> {
  pythonPromise ??= resolvePython({ onProgress: (line) => process.stderr.write(`${line}\n`) }).then((env) => env.python);
  return pythonPromise;
}

/** Run the built CLI (dist/cli.js) as a user would. The process leads its own group. */
export function nimble(args: string[], options: Options = {}): ResultPromise {
  const child = execa(process.execPath, [CLI_PATH, ...args], { reject: false, detached: true, cwd: REPO_ROOT, ...options });
  started.push(child as ResultPromise);
  return child as ResultPromise;
}

export async function tempDir(prefix = "nimble-test-"): Promise<{ dir: string; remove: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

/** Start `nimble provide` on a free loopback port and wait for its listening event. */
export async function startProvider(
  python: string,
  token: string,
  extra: string[] = [],
  opts: { profile?: boolean; env?: NodeJS.ProcessEnv } = {},
): Promise<{ address: string; key: string; child: ResultPromise; listening: Record<string, unknown> }> {
  // Measuring the host's profile takes seconds; only the tests about profiles ask for it.
  const profile = opts.profile ? [] : ["--no-profile"];
  const child = nimble(["provide", "--host", "127.0.0.1", "--port", "0", "--token", token, "--python", python, "--json", "--threads", "1", ...profile, ...extra], {
    buffer: false,
    ...(opts.env ? { env: opts.env } : {}),
  });
  const { address, key, listening } = await new Promise<{ address: string; key: string; listening: Record<string, unknown> }>((resolve, reject) => {
    forEachLine(child.stdout, (line) => {
      try {
        const event = JSON.parse(line);
        if (event.type === "listening") resolve({ address: event.url, key: event.key, listening: event });
      } catch {
        // not an event line
      }
    });
    void child.then((r) => reject(new Error(`provider exited early with code ${r.exitCode}`)));
  });
  return { address, key, child, listening };
}

export { execa };

export type TempDir = Awaited<ReturnType<typeof tempDir>>;

/**
 * What an end-to-end test file needs, made once before its tests and removed after: the
 * interpreter with torch and a temporary folder. `use` receives them when they are ready.
 */
export function useE2E(use: (env: { python: string; tmp: TempDir }) => void): void {
  let tmp: TempDir | null = null;
  beforeAll(async () => {
    const python = await testPython();
    tmp = await tempDir();
    use({ python, tmp });
  }, 600_000);
  afterAll(() => tmp?.remove());
}
