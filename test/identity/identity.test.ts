import { chmod, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { allowedKeys } from "../../src/identity/allowList.js";
import { defaultKeyFile, ephemeralIdentity, fingerprint, loadIdentity, parseKey, signWith, verifySignature } from "../../src/identity/identity.js";

const dir = await mkdtemp(path.join(tmpdir(), "nimble-identity-"));
afterAll(() => rm(dir, { recursive: true, force: true }));

describe("identities", () => {
  it("are made on first use with 0600 permissions in a 0700 folder, and read back the same", async () => {
    const file = path.join(dir, "new", "identity.key");
    const made = await loadIdentity(file, { create: true });
    expect(made.key).toMatch(/^ed25519:[A-Za-z0-9_-]{43}$/);
    expect(made.fingerprint).toBe(fingerprint(made.key));
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    expect((await stat(path.dirname(file))).mode & 0o777).toBe(0o700);
    expect((await loadIdentity(file)).key).toBe(made.key);
  });

  it("are made once when several processes start at once", async () => {
    const file = path.join(dir, "race", "identity.key");
    const keys = await Promise.all(Array.from({ length: 8 }, () => loadIdentity(file, { create: true })));
    expect(new Set(keys.map((k) => k.key)).size).toBe(1);
  });

  it("refuse a key file others can read, a missing one unless asked to make it, and one that is not a key", async () => {
    const file = path.join(dir, "open.key");
    await loadIdentity(file, { create: true });
    await chmod(file, 0o644);
    await expect(loadIdentity(file)).rejects.toThrow(/can be read by others \(mode 644\)/);
    await expect(loadIdentity(path.join(dir, "nope.key"))).rejects.toThrow(/does not exist/);
    const junk = path.join(dir, "junk.key");
    await writeFile(junk, "not a key\n", { mode: 0o600 });
    await expect(loadIdentity(junk)).rejects.toThrow(/is not a PEM private key/);
  });

  it("live under NIMBLE_CONFIG_DIR, else XDG_CONFIG_HOME/nimble, else ~/.config/nimble", () => {
    expect(defaultKeyFile({ NIMBLE_CONFIG_DIR: "/c" })).toBe("/c/identity.key");
    expect(defaultKeyFile({ XDG_CONFIG_HOME: "/x" })).toBe("/x/nimble/identity.key");
    expect(defaultKeyFile({})).toMatch(/\.config\/nimble\/identity\.key$/);
  });

  it("sign, and a signature verifies only for its key and data", () => {
    const a = ephemeralIdentity();
    const b = ephemeralIdentity();
    const sig = signWith(a, Buffer.from("data"));
    expect(verifySignature(a.key, Buffer.from("data"), sig)).toBe(true);
    expect(verifySignature(b.key, Buffer.from("data"), sig)).toBe(false);
    expect(verifySignature(a.key, Buffer.from("date"), sig)).toBe(false);
    expect(verifySignature("ed25519:short", Buffer.from("data"), sig)).toBe(false);
    expect(parseKey(a.key, "x").asymmetricKeyType).toBe("ed25519");
    expect(() => parseKey("ssh-ed25519 AAAA", "--allow")).toThrow(/--allow: "ssh-ed25519 AAAA" is not a nimble key/);
  });
});

describe("allow lists (--allow, --allow-file)", () => {
  it("take keys inline and from files with comments, and name the file and line of a bad one", async () => {
    const [a, b] = [ephemeralIdentity(), ephemeralIdentity()];
    const file = path.join(dir, "researchers.txt");
    await writeFile(file, `# who may start jobs here\n${a.key}  # alice\n\n${b.key}\n`);
    expect(await allowedKeys([a.key], [file])).toEqual([a.key, b.key]);
    await writeFile(file, `${a.key}\nbob's key\n`);
    await expect(allowedKeys([], [file])).rejects.toThrow(`${file}:2: "bob's" is not a nimble key`);
    await expect(allowedKeys([], [path.join(dir, "missing.txt")])).rejects.toThrow(/Cannot read --allow-file/);
    expect((await readFile(file, "utf8")).length).toBeGreaterThan(0);
  });
});
