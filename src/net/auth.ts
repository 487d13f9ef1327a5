import { createHash, timingSafeEqual } from "node:crypto";
import { CLOSE_AUTH_FAILED, CLOSE_BAD_RANK, type RingHello } from "./link.js";

/** Why a connection is refused: the close code and the reason (sent to the peer). */
export interface Refusal {
  code: number;
  reason: string;
}

/** Close code of a control connection whose hello speaks another protocol version. */
export const CLOSE_PROTOCOL_MISMATCH = 4002;

/** What a ring hello is checked against: the running job, and the ranks this host runs. */
export interface RingJob {
  job: string;
  secret: string;
  ranks: ReadonlySet<number>;
}

/**
 * Who may open which connection to this host, and what this host presents when it opens
 * one. Every connection passes through it between accept (or connect) and its hello, so
 * job code only ever sees admitted connections and never a token or secret. Today: the
 * provider's token (control plane, link measurements) and the job's secret (ring links,
 * link measurements between members). The trust issues replace these with identities and
 * TLS-bound proofs here, without touching job code.
 */
export interface Authorizer {
  /** A coordinator's hello on /control: null admits it. */
  admitCoordinator(hello: { token: string; version: number }, version: number): Refusal | null;
  /** A peer measuring its link on /bench (the provider's token, or the running job's secret). */
  admitBench(given: string, job: { secret: string } | null): boolean;
  /** A ring neighbour's hello on /ring, for the running job. */
  admitRingPeer(hello: RingHello, job: RingJob): Refusal | null;
  /** The hello this host sends its ring successor. */
  ringHello(job: { job: string; secret: string }, from: number, to: number, epoch: number): RingHello;
  /** What this host presents to a job peer's /bench when it measures its link. */
  benchCredential(job: { secret: string }): string;
}

/** Today's shared secrets: a provider token and a per-job secret, compared in constant time. */
export class TokenAuthorizer implements Authorizer {
  constructor(private readonly token: string) {}

  admitCoordinator(hello: { token: string; version: number }, version: number): Refusal | null {
    if (hello.version !== version) {
      return {
        code: CLOSE_PROTOCOL_MISMATCH,
        reason: `protocol mismatch: the coordinator speaks protocol ${hello.version}, this provider speaks ${version} (run the same nimble version on both sides)`,
      };
    }
    if (!tokensEqual(hello.token, this.token)) return { code: CLOSE_AUTH_FAILED, reason: "wrong token" };
    return null;
  }

  admitBench(given: string, job: { secret: string } | null): boolean {
    return tokensEqual(given, this.token) || (job !== null && secretsEqual(given, job.secret));
  }

  admitRingPeer(hello: RingHello, job: RingJob): Refusal | null {
    // Both compared, and one reason for either: a refusal must not confirm a job id.
    const jobOk = secretsEqual(hello.job, job.job);
    const secretOk = secretsEqual(hello.secret, job.secret);
    if (!jobOk || !secretOk) return { code: CLOSE_AUTH_FAILED, reason: "ring hello rejected: wrong job or secret" };
    if (!job.ranks.has(hello.to)) return { code: CLOSE_BAD_RANK, reason: `ring hello for rank ${hello.to}, which this provider does not host` };
    return null;
  }

  ringHello(job: { job: string; secret: string }, from: number, to: number, epoch: number): RingHello {
    return { job: job.job, secret: job.secret, from, to, epoch };
  }

  benchCredential(job: { secret: string }): string {
    return job.secret;
  }
}

function digest(s: string): Buffer {
  return createHash("sha256").update(s, "utf8").digest();
}

/** Constant-time string comparison (both sides hashed to equal-length buffers). */
export function secretsEqual(a: string, b: string): boolean {
  return timingSafeEqual(digest(a), digest(b));
}

/** The same for a token: not even its length shows in the time a refusal takes. */
export function tokensEqual(given: string, expected: string): boolean {
  return secretsEqual(given, expected);
}
