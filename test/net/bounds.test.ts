import { describe, expect, it } from "vitest";
import { ConnectionCaps, WarningLimiter } from "../../src/net/bounds.js";

describe("connection caps", () => {
  it("caps connections per address and in all, and frees a slot once released", () => {
    const caps = new ConnectionCaps(3, 2);
    const a1 = caps.admit("a")!;
    const a2 = caps.admit("a")!;
    expect(caps.admit("a")).toBeNull();
    const b1 = caps.admit("b")!;
    expect(caps.admit("c")).toBeNull(); // 3 in all
    a1();
    a1(); // releasing twice frees one slot only
    expect(caps.open).toBe(2);
    expect(caps.admit("a")).not.toBeNull();
    b1();
    a2();
  });
});

describe("warnings held back", () => {
  it("lets one line per key through every interval, then says how many it held", () => {
    const w = new WarningLimiter(5_000);
    expect(w.pass("peer1 hello", "bad hello", 0)).toBe("bad hello");
    for (let i = 1; i <= 199; i++) expect(w.pass("peer1 hello", "bad hello", i)).toBeNull();
    expect(w.pass("peer2 hello", "bad hello from 2", 10)).toBe("bad hello from 2");
    expect(w.pass("peer1 hello", "bad hello", 5_001)).toBe("bad hello (and 199 more like it held back)");
  });
});
