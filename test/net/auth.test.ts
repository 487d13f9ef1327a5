/**
 * Admission decisions (net/auth.ts) as pure functions of a hello and its session binding,
 * and constant-time comparison (it held up in the "Trust 1 of 3" probes): every MAC and
 * job id comparison goes through crypto.timingSafeEqual on two 32-byte values.
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
const { Authorizer, PURPOSE, secretsEqual } = await import("../../src/net/auth.js");
const { ephemeralIdentity } = await import("../../src/identity/identity.js");
const { checkProof, prove } = await import("../../src/identity/proof.js");

beforeEach(() => {
  compared.length = 0;
});

const TOKEN = "0123456789abcdef0123456789abcdef";
const provider = ephemeralIdentity();
const coordinator = ephemeralIdentity();
const session = Buffer.alloc(32, 1);
const hello = (token?: string, who = coordinator, binding = session) => ({ version: 4, ...prove(who, PURPOSE.coordinator, binding, { token }) });

describe("admitting a coordinator", () => {
  it("token mode: admits a MAC made with the token on this session, naming the coordinator's key", () => {
    const auth = new Authorizer(provider, { token: TOKEN, allow: null });
    const got = auth.admitCoordinator(hello(TOKEN), session, 4);
    expect(got).toEqual({ admitted: { key: coordinator.key, fingerprint: coordinator.fingerprint, mode: "token" } });
  });

  it("token mode: refuses a wrong token, no MAC, and a proof made on another session (a replay)", () => {
    const auth = new Authorizer(provider, { token: TOKEN, allow: null });
    expect(auth.admitCoordinator(hello("wrong"), session, 4)).toMatchObject({ refusal: { code: 4001, reason: "wrong token" } });
    expect(auth.admitCoordinator(hello(), session, 4)).toMatchObject({ refusal: { reason: "wrong token" } });
    // Signed and MACed right, but for another TLS session: the signature no longer verifies.
    expect(auth.admitCoordinator(hello(TOKEN, coordinator, Buffer.alloc(32, 2)), session, 4)).toMatchObject({ refusal: { reason: "bad proof" } });
    expect(auth.admitCoordinator(hello(TOKEN), null, 4)).toMatchObject({ refusal: { reason: "bad proof" } });
  });

  it("key mode: admits only listed keys, whatever token they hold", () => {
    const auth = new Authorizer(provider, { token: null, allow: new Set([coordinator.key]) });
    expect(auth.admitCoordinator(hello(), session, 4)).toMatchObject({ admitted: { key: coordinator.key, mode: "key" } });
    expect(auth.admitCoordinator(hello(TOKEN, ephemeralIdentity()), session, 4)).toMatchObject({ refusal: { reason: "key not allowed" } });
  });

  it("refuses another protocol version before anything else, naming both", () => {
    const auth = new Authorizer(provider, { token: TOKEN, allow: null });
    expect(auth.admitCoordinator({ version: 3 }, session, 4)).toMatchObject({ refusal: { code: 4002, reason: expect.stringMatching(/speaks protocol 3, this provider speaks 4/) } });
  });

  it("the welcome proves the provider knows the token, over the coordinator's nonce", () => {
    const auth = new Authorizer(provider, { token: TOKEN, allow: null });
    const h = hello(TOKEN);
    const welcome = auth.welcomeProof(h.nonce, session);
    expect(welcome.key).toBe(provider.key);
    expect(checkProof(welcome, PURPOSE.provider, session, { token: TOKEN, nonces: [h.nonce] })).toEqual({ signed: true, tokenOk: true });
    expect(checkProof(welcome, PURPOSE.provider, session, { token: "other", nonces: [h.nonce] }).tokenOk).toBe(false);
    expect(checkProof(welcome, PURPOSE.provider, session, { token: TOKEN, nonces: [Buffer.alloc(32)] }).signed).toBe(false);
  });
});

describe("constant-time comparison", () => {
  it("compares MACs of every guessed token as 32-byte values: empty, a prefix, longer, one character off", () => {
    const auth = new Authorizer(provider, { token: TOKEN, allow: null });
    const guesses = ["", TOKEN.slice(0, 5), TOKEN.slice(0, -1), `${TOKEN}0`, `${TOKEN.slice(0, -1)}0`, "x".repeat(4096)];
    for (const g of guesses) expect(auth.admitCoordinator(hello(g), session, 4)).toMatchObject({ refusal: { reason: "wrong token" } });
    expect(compared).toHaveLength(guesses.length);
    for (const pair of compared) expect(pair).toEqual([32, 32]);
  });

  it("compares job ids as equal-length digests", () => {
    expect(secretsEqual("job-a", "job-a")).toBe(true);
    expect(secretsEqual("job-a", "job-a-longer")).toBe(false);
    for (const pair of compared) expect(pair).toEqual([32, 32]);
  });
});
