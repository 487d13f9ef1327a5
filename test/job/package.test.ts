import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { buildPackage, readPackage } from "../../src/job/package.js";

const root = await mkdtemp(path.join(tmpdir(), "nimble-package-"));
afterAll(() => rm(root, { recursive: true, force: true }));

async function folder(name: string, files: Record<string, string>) {
  const dir = path.join(root, name);
  for (const [rel, text] of Object.entries(files)) {
    await mkdir(path.dirname(path.join(dir, rel)), { recursive: true });
    await writeFile(path.join(dir, rel), text);
  }
  return dir;
}

describe("task packages", () => {
  it("hold the folder's files in path order, leave out what .nimbleignore and the defaults name, and hash the same twice", async () => {
    const files = { "task.py": "x = 1\n", "lib/model.py": "y = 2\n", "data/a.txt": "a", "big.bin": "zzzz", ".nimbleignore": "*.bin\n/data/\n", "__pycache__/m.pyc": "j", "runs/r/summary.json": "{}" };
    const a = await buildPackage(await folder("a", files));
    expect(a.files.map((f) => f.path)).toEqual(["lib/model.py", "task.py"]);
    const b = await buildPackage(await folder("b", files));
    expect(b.hash).toBe(a.hash);
    expect(b.hash).toMatch(/^[0-9a-f]{64}$/);
    const back = readPackage(a.blob);
    expect(back.files).toEqual(a.files);
    expect(back.data(1).toString()).toBe("x = 1\n");
    const changed = await buildPackage(await folder("c", { ...files, "lib/model.py": "y = 3\n" }));
    expect(changed.hash).not.toBe(a.hash);
  });

  it("refuse a folder without task.py, one past the limit, names providers refuse, and symbolic links", async () => {
    await expect(buildPackage(await folder("noentry", { "main.py": "" }))).rejects.toThrow(/has no task\.py/);
    await expect(buildPackage(await folder("big", { "task.py": "", "data.bin": "x".repeat(4096) }), 1024)).rejects.toThrow(/more than the package limit of 0 MiB \(at task\.py|data\.bin\)/);
    await expect(buildPackage(await folder("spaces", { "task.py": "", "my notes.txt": "" }))).rejects.toThrow(/"my notes\.txt" has a name providers refuse/);
    const linked = await folder("linked", { "task.py": "" });
    await symlink("/etc/hostname", path.join(linked, "host"));
    await expect(buildPackage(linked)).rejects.toThrow(/host is a symbolic link/);
  });

  it("are read back only with relative names and sizes that add up", async () => {
    const pkg = await buildPackage(await folder("ok", { "task.py": "x" }));
    const forge = (manifest: unknown, body: string) => {
      const m = Buffer.from(JSON.stringify(manifest));
      const head = Buffer.alloc(4);
      head.writeUInt32LE(m.length);
      return Buffer.concat([head, m, Buffer.from(body)]);
    };
    expect(() => readPackage(forge([{ path: "../evil.py", size: 1 }], "x"))).toThrow(/a name providers refuse/);
    expect(() => readPackage(forge([{ path: "/etc/passwd", size: 1 }], "x"))).toThrow(/a name providers refuse/);
    expect(() => readPackage(forge([{ path: "task.py", size: 5 }], "x"))).toThrow(/add up to/);
    expect(() => readPackage(pkg.blob.subarray(0, 3))).toThrow(/shorter than its header/);
    expect(readPackage(pkg.blob).files).toEqual([{ path: "task.py", size: 1 }]);
  });
});
