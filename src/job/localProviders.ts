import { execa } from "execa";
import { UserError } from "../errors.js";
import { forEachLine } from "../runtime/lines.js";
import { CLI_PATH } from "../runtime/paths.js";
import type { Identity } from "../identity/identity.js";
import type { HostProbe } from "../runtime/python.js";

export interface LocalProvider {
  address: string;
  /** Its identity key (the researcher's own: they run as this user). */
  key: string;
  pid: number | undefined;
}

export interface LocalProviderOptions {
  count: number;
  /** The researcher's identity (kept in a file): local providers use it and admit only it. */
  identity: Identity;
  /** false: their jobs run unconfined (--no-sandbox, loudly warned by each). */
  sandbox?: boolean;
  python: string;
  /** The coordinator's probe of `python`: handed down, so that each provider does not import torch again to learn it. */
  probe?: HostProbe;
  /** torch threads per worker, so N local workers share this host's cores instead of fighting. */
  threads: number;
  onLog: (source: string, line: string) => void;
  env?: NodeJS.ProcessEnv;
}

/**
 * Start `count` `nimble provide` processes on loopback (each on a free port) for a job that
 * names no providers. They take the same path as remote ones: TLS, in key mode, with the
 * researcher's key as theirs and as the one key they admit. stop() ends them and
 * everything they started.
 */
export async function startLocalProviders(opts: LocalProviderOptions): Promise<{ providers: LocalProvider[]; stop: () => Promise<void> }> {
  const children = Array.from({ length: opts.count }, (_, i) => {
    const child = execa(
      process.execPath,
      // Local providers share this host: measuring it once per provider would only
      // measure their contention. The coordinator learns their speed from the steps.
      [
        CLI_PATH, "provide", "--host", "127.0.0.1", "--port", "0", "--json", "--no-profile", "--managed",
        "--key", opts.identity.file!, "--allow", opts.identity.key,
        "--python", opts.python, "--threads", String(opts.threads),
        ...(opts.sandbox === false ? ["--no-sandbox"] : []),
      ],
      { env: { ...opts.env, NIMBLE_PYTHON: opts.python, ...(opts.probe ? { NIMBLE_HOST_PROBE: JSON.stringify(opts.probe) } : {}) }, buffer: false, reject: false, stdin: "ignore", cleanup: true },
    );
    return { child, label: `provider ${i}` };
  });
  const stop = async () => {
    for (const { child } of children) if (child.exitCode === null) child.kill("SIGTERM");
    const timer = setTimeout(() => children.forEach(({ child }) => child.kill("SIGKILL")), 8000);
    await Promise.all(children.map(({ child }) => child.catch(() => undefined)));
    clearTimeout(timer);
  };
  try {
    const providers = await Promise.all(children.map(({ child, label }) => waitForListening(child, label, opts.onLog)));
    return { providers, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

function waitForListening(child: ReturnType<typeof execa>, label: string, onLog: LocalProviderOptions["onLog"]): Promise<LocalProvider> {
  return new Promise((resolve, reject) => {
    let listening = false;
    const stderrTail: string[] = [];
    forEachLine(child.stderr, (line) => {
      stderrTail.push(line);
      if (stderrTail.length > 10) stderrTail.shift();
      onLog(label, line);
    });
    forEachLine(child.stdout, (line) => {
      let event: { type?: string; url?: string; key?: string };
      try {
        event = JSON.parse(line);
      } catch {
        onLog(label, line);
        return;
      }
      if (event.type === "listening" && !listening) {
        listening = true;
        resolve({ address: event.url!, key: event.key!, pid: child.pid });
      }
      // Worker output reaches the coordinator over the control plane; printing the
      // provider's own copy too would show every line twice.
    });
    void child.then((result) => {
      if (!listening) {
        reject(new UserError(`Local ${label} exited before listening (code ${result.exitCode}): ${stderrTail.join("\n")}`));
      }
    });
  });
}
