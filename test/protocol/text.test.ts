import { describe, expect, it } from "vitest";
import { cleanText, cutText } from "../../src/protocol/text.js";

describe("peer text", () => {
  it("turns terminal escapes and other control characters into U+FFFD", () => {
    expect(cleanText("ok \u001b[2J\u001b]0;pwned\u0007 done\r", 100)).toBe("ok \ufffd[2J\ufffd]0;pwned\ufffd done\ufffd");
    expect(cleanText("a\u009bb\u007fc\u0000", 100)).toBe("a\ufffdb\ufffdc\ufffd");
    expect(cleanText("two\nlines\ttab", 100)).toBe("two lines\ttab");
    expect(cleanText("two\nlines", 100, { multiline: true })).toBe("two\nlines");
  });

  it("cuts over-long text to its head and tail, saying how much went", () => {
    const long = "H".repeat(50_000) + "the real error";
    const cut = cutText(long, 1000);
    expect(cut.length).toBeLessThanOrEqual(1000);
    expect(cut.startsWith("HHH")).toBe(true);
    expect(cut.endsWith("the real error")).toBe(true);
    expect(cut).toMatch(/\[49014 characters cut\]/);
    expect(cutText("short", 10)).toBe("short");
  });
});
