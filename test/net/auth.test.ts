/**
 * Token and secret comparison stays constant-time (it held up in the "Trust 1 of 3"
 * probes): every comparison, whatever the length or prefix of what was given, goes
 * through crypto.timingSafeEqual on two digests of equal length.
 */
import { beforeEach, describe, expect, it, vi } from "vitest";

const compared: [number, number][] = [];
vi.mock("node:crypto", async (importOriginal) => {
  const crypto = await importOriginal<typeof import("node:crypto")>();
  return {
    ...crypto,
    timingSafeEqual: (a: NodeJS.ArrayBufferView, b: NodeJS.ArrayBufferView) => {
      compared.push([a.byteLength, b.byteLength]);
      return crypto.timingSafeEqual(a, b);
    },
  };
});
const { secretsEqual, TokenAuthorizer, tokensEqual } = await import("../../src/net/auth.js");

beforeEach(() => {
  compared.length = 0;
});

describe("constant-time comparison of tokens and secrets", () => {
  const TOKEN = "0123456789abcdef0123456789abcdef";

  it("compares equal-length digests for every guess: empty, a prefix, longer, one character off", () => {
    const guesses = ["", TOKEN.slice(0, 5), TOKEN.slice(0, -1), `${TOKEN}0`, `${TOKEN.slice(0, -1)}0`, "x".repeat(4096)];
    for (const g of guesses) expect(tokensEqual(g, TOKEN)).toBe(false);
    expect(tokensEqual(TOKEN, TOKEN)).toBe(true);
    expect(compared).toHaveLength(guesses.length + 1);
    for (const [a, b] of compared) expect([a, b]).toEqual([32, 32]);
  });

  it("refuses a coordinator's wrong token and a ring peer's wrong secret through that comparison", () => {
    const auth = new TokenAuthorizer(TOKEN);
    expect(auth.admitCoordinator({ token: TOKEN.slice(0, 4), version: 3 }, 3)?.reason).toBe("wrong token");
    expect(auth.admitCoordinator({ token: TOKEN, version: 3 }, 3)).toBeNull();
    const job = { job: "j", secret: "the-secret", ranks: new Set([1]) };
    expect(auth.admitRingPeer({ job: "j", secret: "the", from: 0, to: 1, epoch: 0 }, job)?.reason).toMatch(/wrong job or secret/);
    expect(compared.length).toBeGreaterThanOrEqual(4);
    for (const [a, b] of compared) expect([a, b]).toEqual([32, 32]);
    expect(secretsEqual("a", "a")).toBe(true);
  });
});
