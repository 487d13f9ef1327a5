import { PassThrough } from "node:stream";
import { describe, expect, it } from "vitest";
import { forEachLine } from "../../src/runtime/lines.js";

describe("a worker's output lines", () => {
  it("splits lines across chunks and drops blank ones", async () => {
    const s = new PassThrough();
    const got: string[] = [];
    forEachLine(s, (l) => got.push(l));
    s.write("one\ntw");
    s.write("o\r\n\n   \nthree");
    s.end();
    await new Promise((r) => s.on("end", r));
    expect(got).toEqual(["one", "two", "three"]);
  });

  it("cuts an endless line and keeps memory bounded", async () => {
    const s = new PassThrough();
    const got: string[] = [];
    forEachLine(s, (l) => got.push(l), 1000);
    const before = process.memoryUsage().heapUsed;
    const chunk = "x".repeat(1024 * 1024);
    for (let i = 0; i < 200; i++) s.write(chunk); // 200 MB with no newline
    s.write("\nafter\n");
    s.end();
    await new Promise((r) => s.on("end", r));
    expect(got).toHaveLength(2);
    expect(got[0]).toBe(`${"x".repeat(1000)} … [line cut: ${200 * 1024 * 1024 - 1000} more characters]`);
    expect(got[1]).toBe("after");
    expect(process.memoryUsage().heapUsed - before).toBeLessThan(64 * 1024 * 1024);
  });
});
