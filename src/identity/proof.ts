/**
 * Handshake proofs, bound to one TLS session (net/tls.ts `sessionBinding`). The opener of
 * a connection sends a fresh nonce, its key, and:
 * - a signature by its identity key over the transcript (always: it names who it is);
 * - in token mode, a MAC of the transcript keyed by the token (the token never travels).
 * The answering side proves itself the same way over the opener's nonce and its own.
 * Ring peers also carry a credential: the coordinator's signature over (job, key, ranks).
 */
import { createHash, createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { signWith, verifySignature, type Identity } from "./identity.js";

export const NONCE_BYTES = 32;

export interface Proof {
  key: string;
  nonce: Uint8Array;
  sig: Uint8Array;
  mac?: Uint8Array;
}

/** What a coordinator signs for a provider: this key may stand for these ranks of this job. */
export interface Credential {
  ranks: number[];
  sig: Uint8Array;
}

/** sha256 over the purpose, the session binding, the nonces, the key and a context, length-prefixed. */
export function transcript(purpose: string, binding: Uint8Array, nonces: Uint8Array[], key: string, context = ""): Buffer {
  const h = createHash("sha256").update("nimble-handshake-v1");
  for (const part of [Buffer.from(purpose), binding, ...nonces, Buffer.from(key), Buffer.from(context)]) {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(part.byteLength);
    h.update(len).update(part);
  }
  return h.digest();
}

export function freshNonce(): Buffer {
  return randomBytes(NONCE_BYTES);
}

export function macOf(token: string, data: Uint8Array): Buffer {
  return createHmac("sha256", token).update(data).digest();
}

/** Constant-time check of a MAC (false for a missing or malformed one). */
export function macValid(token: string, data: Uint8Array, mac: Uint8Array | undefined): boolean {
  if (!mac || mac.byteLength !== 32) return false;
  return timingSafeEqual(macOf(token, data), Buffer.from(mac.buffer, mac.byteOffset, mac.byteLength));
}

/** The opener's proof for `purpose` on the session `binding`. */
export function prove(identity: Identity, purpose: string, binding: Uint8Array, opts: { token?: string; context?: string; nonces?: Uint8Array[] } = {}): Proof {
  const nonce = freshNonce();
  const data = transcript(purpose, binding, [...(opts.nonces ?? []), nonce], identity.key, opts.context);
  return { key: identity.key, nonce, sig: signWith(identity, data), ...(opts.token !== undefined ? { mac: macOf(opts.token, data) } : {}) };
}

/** What a proof shows on `binding`: a valid signature by its key, and whether its MAC matches `token`. */
export function checkProof(proof: Proof, purpose: string, binding: Uint8Array, opts: { token?: string; context?: string; nonces?: Uint8Array[] } = {}): { signed: boolean; tokenOk: boolean } {
  if (proof.nonce.byteLength !== NONCE_BYTES) return { signed: false, tokenOk: false };
  const data = transcript(purpose, binding, [...(opts.nonces ?? []), proof.nonce], proof.key, opts.context);
  return { signed: verifySignature(proof.key, data, proof.sig), tokenOk: opts.token !== undefined && macValid(opts.token, data, proof.mac) };
}

function credentialBytes(job: string, key: string, ranks: number[]): Buffer {
  return transcript("ring-credential", new Uint8Array(0), [], key, `${job}\n${ranks.join(",")}`);
}

/** The coordinator's credential for the provider with `key`, hosting `ranks` of `job`. */
export function issueCredential(coordinator: Identity, job: string, key: string, ranks: number[]): Credential {
  return { ranks: [...ranks], sig: signWith(coordinator, credentialBytes(job, key, ranks)) };
}

export function credentialValid(credential: Credential, coordinatorKey: string, job: string, key: string): boolean {
  return verifySignature(coordinatorKey, credentialBytes(job, key, credential.ranks), credential.sig);
}
