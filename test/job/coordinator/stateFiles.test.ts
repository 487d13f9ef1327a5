import { describe, expect, it } from "vitest";
import { checkStateFiles } from "../../../src/job/coordinator/stateFiles.js";

const file = (name: string, bytes = 4) => ({ name, data: new Uint8Array(bytes) });

describe("state files from a provider", () => {
  it("accepts the files each kind holds", () => {
    expect(() => checkStateFiles("final", [file("model.safetensors")], "rank 0")).not.toThrow();
    expect(() => checkStateFiles("checkpoint", ["model.pt", "optimizer.pt", "schedule.pt", "data.json", "rng.pt", "meta.json", "compressor.pt"].map((n) => file(n)), "rank 0")).not.toThrow();
    expect(() => checkStateFiles("compressor", [file("compressor.pt")], "rank 1")).not.toThrow();
  });

  it.each(["task.py", "config.yaml", "metrics.jsonl", "summary.json", ".", "..", "manifest.json"])("refuses a final state file named %j, which the run would then use", (name) => {
    expect(() => checkStateFiles("final", [file("model.safetensors"), file(name)], "rank 2 (ws://evil:1)")).toThrow(/^rank 2 \(ws:\/\/evil:1\) sent a final state file named/);
  });

  it("refuses a file twice, a compressor state with more than compressor.pt, and final weights without the model", () => {
    expect(() => checkStateFiles("final", [file("model.safetensors"), file("model.safetensors")], "r")).toThrow(/twice/);
    expect(() => checkStateFiles("compressor", [file("compressor.pt"), file("model.pt")], "r")).toThrow(/holds only compressor\.pt/);
    expect(() => checkStateFiles("final", [], "r")).toThrow(/without model\.safetensors/);
  });
});
