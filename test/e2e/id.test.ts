import { chmod, stat } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, type TempDir, useE2E } from "../helpers/processes.js";

let tmp: TempDir;
useE2E((env) => ({ tmp } = env));

describe("nimble id", () => {
  it("makes the identity on first use, prints the same one after, and refuses a key file others can read", async () => {
    const env = { ...process.env, NIMBLE_CONFIG_DIR: path.join(tmp.dir, "config") };
    const first = await nimble(["id", "--json"], { env });
    expect(first.exitCode, String(first.stderr)).toBe(0);
    const id = JSON.parse(String(first.stdout));
    expect(id).toMatchObject({ key: expect.stringMatching(/^ed25519:[A-Za-z0-9_-]{43}$/), fingerprint: expect.stringMatching(/^[0-9a-f]{4}(:[0-9a-f]{4}){3}$/), file: path.join(tmp.dir, "config", "identity.key") });
    expect((await stat(id.file)).mode & 0o777).toBe(0o600);
    const again = await nimble(["id"], { env });
    expect(String(again.stdout)).toContain(id.key);
    expect(String(again.stdout)).toContain(`fingerprint: ${id.fingerprint}`);
    // --key chooses another identity.
    const other = JSON.parse(String((await nimble(["id", "--json", "--key", path.join(tmp.dir, "other.key")], { env })).stdout));
    expect(other.key).not.toBe(id.key);
    await chmod(id.file, 0o644);
    const open = await nimble(["id"], { env });
    expect(open.exitCode).not.toBe(0);
    expect(String(open.stderr)).toMatch(/error: Key file .* can be read by others \(mode 644\)\nhint: Run `chmod 600 /);
  });
});
