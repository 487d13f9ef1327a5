/**
 * The wire shapes of identities and proofs (src/identity/), shared by the control plane
 * (protocol/messages.ts) and the ring hello (protocol/frames.ts).
 */
import { z } from "zod";
import { KEY_PATTERN } from "../identity/identity.js";

/** Binary data of exactly `n` bytes. */
export const sized = (n: number) => z.custom<Uint8Array>((value) => value instanceof Uint8Array && value.byteLength === n, `expected ${n} bytes`);
/** An identity key, `ed25519:<base64url>`. */
export const keySchema = z.string().regex(KEY_PATTERN, "expected an ed25519: key");
/** A handshake proof (src/identity/proof.ts): the sender's key, a fresh nonce, its signature, and in token mode a MAC. */
export const proofFields = { key: keySchema, nonce: sized(32), sig: sized(64), mac: sized(32).optional() };
/** The coordinator's signature that a provider's key stands for these ranks of the job. */
export const credentialSchema = z.object({ ranks: z.array(z.number().int().min(0).max(0xffff)).min(1).max(4096), sig: sized(64) }).strict();
