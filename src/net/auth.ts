import { createHash, timingSafeEqual } from "node:crypto";
import type { RingHello } from "./link.js";
import { CLOSE_AUTH_FAILED, CLOSE_BAD_RANK } from "./link.js";
import { fingerprint, type Identity } from "../identity/identity.js";
import { checkProof, credentialValid, prove, type Credential, type Proof } from "../identity/proof.js";

/** Why a connection is refused: the close code and the reason (sent to the peer). */
export interface Refusal {
  code: number;
  reason: string;
}

/** Close code of a control connection whose hello speaks another protocol version. */
export const CLOSE_PROTOCOL_MISMATCH = 4002;

/** Reasons a coordinator's hello is refused for its credentials (rate-limited per address). */
export const WRONG_TOKEN = "wrong token";
export const KEY_NOT_ALLOWED = "key not allowed";
export const BAD_PROOF = "bad proof";

/** The label of the keying material control proofs are bound to (net/tls.ts `sessionBinding`). */
export const CONTROL_BINDING = "control";

/** What purposes proofs are made for: a proof for one is worth nothing for another. */
export const PURPOSE = { coordinator: "control-coordinator", provider: "control-provider", ring: "ring", bench: "bench" } as const;

/** What a ring hello is checked against: the running job, its coordinator, and the ranks this host runs. */
export interface RingJob {
  job: string;
  coordinatorKey: string;
  ranks: ReadonlySet<number>;
}

/** A coordinator admitted on /control: who it is, and how it proved it. */
export interface Admitted {
  key: string;
  fingerprint: string;
  mode: "key" | "token";
}

/** A peer's hello on /bench: a proof, and for a job member its credential. */
export interface BenchHello extends Proof {
  job?: string;
  credential?: Credential;
}

/**
 * Who may open which connection to this host, and what this host presents when it opens
 * one. Every connection passes through it between accept (or connect) and its hello, so
 * job code only ever sees admitted connections. Each proof is bound to its TLS session
 * (`binding`, net/tls.ts), so nothing recorded on one connection opens another.
 * - Key mode (`allow`): a coordinator is admitted when its key is listed and it signs.
 * - Token mode: a coordinator proves it knows the token by a MAC; the token never travels.
 * - Ring peers and job members on /bench show the coordinator's credential for their key.
 */
export class Authorizer {
  constructor(
    readonly identity: Identity,
    private readonly trust: { token: string | null; allow: ReadonlySet<string> | null },
  ) {}

  get mode(): "key" | "token" {
    return this.trust.allow ? "key" : "token";
  }

  /** A coordinator's hello on /control. */
  admitCoordinator(
    hello: { version: number; key?: string; nonce?: Uint8Array; sig?: Uint8Array; mac?: Uint8Array },
    binding: Uint8Array | null,
    version: number,
  ): { admitted: Admitted } | { refusal: Refusal } {
    if (hello.version !== version) {
      return {
        refusal: {
          code: CLOSE_PROTOCOL_MISMATCH,
          reason: `protocol mismatch: the coordinator speaks protocol ${hello.version}, this provider speaks ${version} (run the same nimble version on both sides)`,
        },
      };
    }
    const refuse = (reason: string) => ({ refusal: { code: CLOSE_AUTH_FAILED, reason } });
    if (!binding || !hello.key || !hello.nonce || !hello.sig) return refuse(BAD_PROOF);
    const proof = { key: hello.key, nonce: hello.nonce, sig: hello.sig, mac: hello.mac };
    const { signed, tokenOk } = checkProof(proof, PURPOSE.coordinator, binding, { token: this.trust.token ?? undefined });
    if (!signed) return refuse(BAD_PROOF);
    if (this.trust.allow) {
      if (!this.trust.allow.has(hello.key)) return refuse(KEY_NOT_ALLOWED);
      return { admitted: { key: hello.key, fingerprint: fingerprint(hello.key), mode: "key" } };
    }
    if (!tokenOk) return refuse(WRONG_TOKEN);
    return { admitted: { key: hello.key, fingerprint: fingerprint(hello.key), mode: "token" } };
  }

  /** The provider's proof in its welcome, over the coordinator's nonce. */
  welcomeProof(coordinatorNonce: Uint8Array, binding: Uint8Array): Proof {
    return prove(this.identity, PURPOSE.provider, binding, { token: this.mode === "token" ? (this.trust.token ?? undefined) : undefined, nonces: [coordinatorNonce] });
  }

  /** A peer measuring its link on /bench: a coordinator this host admits, or a member of its running job. */
  admitBench(hello: BenchHello, binding: Uint8Array | null, job: RingJob | null): boolean {
    if (!binding) return false;
    const { signed, tokenOk } = checkProof(hello, PURPOSE.bench, binding, { token: this.trust.token ?? undefined });
    if (!signed) return false;
    if (this.trust.allow ? this.trust.allow.has(hello.key) : tokenOk) return true;
    return job !== null && hello.job !== undefined && hello.credential !== undefined && secretsEqual(hello.job, job.job) && credentialValid(hello.credential, job.coordinatorKey, job.job, hello.key);
  }

  /** A ring neighbour's hello on /ring, for the running job. */
  admitRingPeer(hello: RingHello, binding: Uint8Array | null, job: RingJob): Refusal | null {
    // One reason for every failure: a refusal must not confirm a job id.
    const refused = { code: CLOSE_AUTH_FAILED, reason: "ring hello rejected: not a member of this job" };
    if (!binding || !secretsEqual(hello.job, job.job)) return refused;
    const { signed } = checkProof(hello, PURPOSE.ring, binding, { context: ringContext(hello) });
    if (!signed || !hello.credential.ranks.includes(hello.from) || !credentialValid(hello.credential, job.coordinatorKey, job.job, hello.key)) return refused;
    if (!job.ranks.has(hello.to)) return { code: CLOSE_BAD_RANK, reason: `ring hello for rank ${hello.to}, which this provider does not host` };
    return null;
  }

  /** The hello this host sends its ring successor on the session `binding`. */
  ringHello(job: { job: string; credential: Credential }, from: number, to: number, epoch: number, binding: Uint8Array, group?: string): RingHello {
    const base = { job: job.job, from, to, epoch, ...(group ? { group } : {}) };
    return { ...base, ...prove(this.identity, PURPOSE.ring, binding, { context: ringContext(base) }), credential: job.credential };
  }

  /** What this host presents to a job peer's /bench when it measures its link. */
  benchHello(job: { job: string; credential: Credential }, binding: Uint8Array): BenchHello {
    return { ...prove(this.identity, PURPOSE.bench, binding), job: job.job, credential: job.credential };
  }
}

function ringContext(h: { job: string; from: number; to: number; epoch?: number; group?: string }): string {
  // A group's links are signed as such: a ring link cannot be replayed as a pipe's.
  return `${h.job}\n${h.from}->${h.to}@${h.epoch ?? 0}${h.group ? `#${h.group}` : ""}`;
}

function digest(s: string): Buffer {
  return createHash("sha256").update(s, "utf8").digest();
}

/** Constant-time string comparison (both sides hashed to equal-length buffers). */
export function secretsEqual(a: string, b: string): boolean {
  return timingSafeEqual(digest(a), digest(b));
}
