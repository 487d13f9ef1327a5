import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { chooseDevices, loadProviderConfig, readTokenFile, workerLimits } from "../../../src/job/provider/settings.js";
import { parseSize } from "../../../src/runtime/limits.js";

const dir = await mkdtemp(path.join(tmpdir(), "nimble-provider-settings-"));
afterAll(() => rm(dir, { recursive: true, force: true }));

describe("the provider config file", () => {
  it("holds every setting, validated", async () => {
    const file = path.join(dir, "provider.yaml");
    await writeFile(
      file,
      ["host: 0.0.0.0", "port: 7070", "allow_file: [researchers.txt]", "devices: [cuda:0, 2]", "max_memory: 8GB", "max_job_hours: 12", "sandbox: true", "testing: {latency_ms: 25}"].join("\n") + "\n",
    );
    expect(await loadProviderConfig(file)).toEqual({
      host: "0.0.0.0",
      port: 7070,
      allow_file: ["researchers.txt"],
      devices: ["cuda:0", 2],
      max_memory: "8GB",
      max_job_hours: 12,
      sandbox: true,
      testing: { latency_ms: 25 },
    });
  });

  it("names the line and field of a bad value, and unknown keys", async () => {
    const file = path.join(dir, "bad.yaml");
    await writeFile(file, "host: 0.0.0.0\nport: 99999\nmax_job_hours: 1000\ntoken: in-the-clear\n");
    const err = await loadProviderConfig(file).catch((e: Error) => e);
    expect((err as Error).message.split("\n").slice(1)).toEqual([
      `  ${file}:2:7: port: expected an integer >= 0 and <= 65535, found 99999`,
      `  ${file}:3:16: max_job_hours: expected a number > 0 and <= 500, found 1000`,
      `  ${file}:4:1: token: unknown key "token"; allowed keys: host, port, key, allow, allow_file, token_file, python, torch, threads, max_micro_batch, profile, devices, max_memory, max_processes, max_job_hours, job_requirements, warm, sandbox, testing`,
    ]);
  });
});

describe("the owner's settings", () => {
  it("reads a token file that only its owner can read", async () => {
    const file = path.join(dir, "token");
    await writeFile(file, "s3cret-token-value\n", { mode: 0o600 });
    expect(await readTokenFile(file)).toBe("s3cret-token-value");
    await chmod(file, 0o644);
    await expect(readTokenFile(file)).rejects.toThrow(/can be read by others \(mode 644\)/);
  });

  it("offers the devices named, by id or GPU index, and names one the host lacks", () => {
    const all = [
      { id: "cpu", kind: "cpu", name: "cpu" },
      { id: "cuda:0", kind: "cuda", name: "A" },
      { id: "cuda:2", kind: "cuda", name: "B" },
    ];
    expect(chooseDevices(all, undefined)).toEqual(all);
    expect(chooseDevices(all, ["2", "cpu"]).map((d) => d.id)).toEqual(["cpu", "cuda:2"]);
    expect(chooseDevices(all, ["cuda:0,cuda:2"]).map((d) => d.id)).toEqual(["cuda:0", "cuda:2"]);
    expect(() => chooseDevices(all, ["cuda:1"])).toThrow(/--devices names cuda:1, which this host does not have/);
  });

  it("reads --max-memory sizes, and refuses what is not one", () => {
    expect(parseSize("8GB")).toBe(8e9);
    expect(parseSize("1.5GiB")).toBe(1.5 * 1024 ** 3);
    expect(parseSize("512mb")).toBe(512e6);
    expect(() => parseSize("lots")).toThrow(/expected a size of at least 64MB/);
    expect(() => parseSize("1MB")).toThrow(/at least 64MB/);
    expect(workerLimits("2GB", 128)).toMatchObject({ maxMemoryBytes: 2e9, maxProcesses: 128 });
    expect(() => workerLimits("two gigs", undefined)).toThrow(/--max-memory: expected a size/);
  });
});
