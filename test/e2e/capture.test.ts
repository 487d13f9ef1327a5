/**
 * What a wire-tapper on the link sees of a real job (issue "Trust 2 of 3"): a loopback
 * capture (tcpdump) of two providers training in token mode holds TLS records only:
 * neither the token, nor any key (private or public), nor the task's code or the workers'
 * reports in the clear.
 * Before TLS, the same capture held the token twice once WebSocket masking was undone.
 */
import { createPrivateKey, createPublicKey } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { defaultKeyFile } from "../../src/identity/identity.js";
import { forEachLine } from "../../src/runtime/lines.js";
import { execa, nimble, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { tinyTask } from "../helpers/tasks.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const TOKEN = "capture-token-7f3a91c2e5d84b06";

describe("a packet capture of a real job", () => {
  it("holds TLS records only: no token, no key material, no task code", async () => {
    const providers = [await startProvider(python, TOKEN), await startProvider(python, TOKEN)];
    const ports = providers.map((p) => new URL(p.address).port);
    const pcap = path.join(tmp.dir, "job.pcap");
    const dump = execa("tcpdump", ["-i", "lo", "-U", "-s", "0", "-w", pcap, ports.map((p) => `tcp port ${p}`).join(" or ")], { reject: false });
    await new Promise<void>((resolve, reject) => {
      forEachLine(dump.stderr!, (line) => /listening on/.test(line) && resolve());
      void dump.then((r) => reject(new Error(`tcpdump exited: ${r.stderr}`)));
    });
    const task = tinyTask({ train: 64, val: 16 });
    await writeFile(path.join(tmp.dir, "task.py"), task);
    const config = path.join(tmp.dir, "nimble.yaml");
    await writeFile(
      config,
      [
        "name: capture",
        "task: task.py",
        "steps: 3",
        "batch_size: 16",
        "compression: {method: none}",
        "checkpoint: {every: 2}",
        `output: ${path.join(tmp.dir, "runs")}`,
        "providers:",
        ...providers.map((p) => `  - {address: "${p.address}", token: ${TOKEN}}`),
      ].join("\n") + "\n",
    );
    const run = await nimble(["train", config, "--quiet", "--python", python], { timeout: 240_000 });
    expect(run.exitCode, String(run.stderr)).toBe(0);
    await new Promise((r) => setTimeout(r, 300));
    dump.kill("SIGINT");
    await dump;

    const captured = await readFile(pcap);
    expect(captured.byteLength).toBeGreaterThan(20_000); // the job's traffic was captured
    // TLS 1.3 application data records (type 0x17, legacy version 0x0303) carry it.
    expect(captured.indexOf(Buffer.from([0x17, 0x03, 0x03]))).toBeGreaterThanOrEqual(0);
    const key = createPrivateKey(await readFile(defaultKeyFile()));
    const jwk = key.export({ format: "jwk" }) as { d: string; x: string };
    const pem = (await readFile(defaultKeyFile(), "utf8")).split("\n").filter((l) => l && !l.startsWith("-----")).join("");
    const secrets: [string, Buffer][] = [
      ["the token", Buffer.from(TOKEN)],
      ["the private key", Buffer.from(jwk.d, "base64url")],
      ["the private key file", Buffer.from(pem)],
      ["the public key", Buffer.from(jwk.x, "base64url")],
      ["the public key as written", Buffer.from(`ed25519:${jwk.x}`)],
      ["the task's code", Buffer.from("def build_model")],
      // Provider-to-coordinator frames are not masked: over plain ws these were readable.
      ["the workers' reports", Buffer.from("step_done")],
    ];
    expect(createPublicKey(key).export({ format: "jwk" }).x).toBe(jwk.x);
    for (const [what, bytes] of secrets) expect(captured.indexOf(bytes), `${what} is in the capture`).toBe(-1);
    for (const p of providers) p.child.kill("SIGTERM");
  }, 300_000);
});
