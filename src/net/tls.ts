/**
 * TLS 1.3 for every link (control, ring, bench). A host's certificate is self-signed and
 * its key is the host's identity key, so a peer checks the certificate against the
 * identity it expects: no certificate authority, and no trust on first use. Node can
 * serve an Ed25519 certificate but cannot make one; @peculiar/x509 makes it (kept,
 * WebCrypto-based, and it supports Ed25519; `selfsigned` wraps it too).
 *
 * What a handshake proof is bound to: keying material exported from the TLS session
 * (RFC 5705), the same on both ends of one session and different on every other, so a
 * proof recorded on one connection, or relayed by a man in the middle holding its own
 * certificate, is worth nothing on another.
 */
import { webcrypto } from "node:crypto";
import type { TLSSocket } from "node:tls";
import type WebSocket from "ws";
import { keyString, type Identity } from "../identity/identity.js";

export interface TlsCredentials {
  key: string;
  cert: string;
}

export const TLS_MIN_VERSION = "TLSv1.3" as const;
const ED25519 = { name: "Ed25519" };
const made = new WeakMap<Identity, Promise<TlsCredentials>>();

/** The host's self-signed certificate for its identity (made once per process). */
export function tlsCredentials(identity: Identity): Promise<TlsCredentials> {
  let creds = made.get(identity);
  if (!creds) {
    creds = makeCertificate(identity);
    made.set(identity, creds);
  }
  return creds;
}

async function makeCertificate(identity: Identity): Promise<TlsCredentials> {
  // Loaded here, by the servers that make a certificate: a coordinator only checks one (seconds saved on a busy host).
  const x509 = await import("@peculiar/x509");
  x509.cryptoProvider.set(webcrypto as unknown as Crypto);
  const subtle = webcrypto.subtle;
  const keys = {
    privateKey: await subtle.importKey("pkcs8", identity.privateKey.export({ format: "der", type: "pkcs8" }), ED25519, false, ["sign"]),
    publicKey: await subtle.importKey("spki", identity.publicKey.export({ format: "der", type: "spki" }), ED25519, true, ["verify"]),
  };
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: Buffer.from(identity.fingerprint.replace(/:/g, ""), "hex").toString("hex"),
    name: `CN=nimble ${identity.fingerprint}`,
    notBefore: new Date(now - 24 * 3600_000),
    notAfter: new Date(now + 10 * 365 * 24 * 3600_000),
    signingAlgorithm: ED25519,
    keys: keys as unknown as CryptoKeyPair,
  });
  return { key: identity.privateKey.export({ format: "pem", type: "pkcs8" }) as string, cert: cert.toString("pem") };
}

/** A server's TLS options for `identity`: its certificate, TLS 1.3 only (OpenSSL's default suites). */
export async function tlsServerOptions(identity: Identity): Promise<TlsCredentials & { minVersion: typeof TLS_MIN_VERSION }> {
  return { ...(await tlsCredentials(identity)), minVersion: TLS_MIN_VERSION };
}

/** Options for a TLS client that checks the server's key itself (after the handshake). */
export const TLS_CLIENT_OPTIONS = { minVersion: TLS_MIN_VERSION, rejectUnauthorized: false } as const;

/** The TLS socket under a WebSocket, or null for a plain one. */
export function tlsSocketOf(ws: WebSocket): TLSSocket | null {
  const socket = (ws as unknown as { _socket?: TLSSocket })._socket;
  return socket && typeof socket.exportKeyingMaterial === "function" ? socket : null;
}

const peerKeys = new WeakMap<TLSSocket, string | null>();

/** The identity key of the peer's certificate (null: no TLS, or not an Ed25519 certificate). */
export function peerKey(ws: WebSocket): string | null {
  const socket = tlsSocketOf(ws);
  if (!socket) return null;
  // Node hands out the peer's X509Certificate once per socket (a second call gives undefined).
  if (!peerKeys.has(socket)) {
    const cert = socket.getPeerX509Certificate();
    let key: string | null = null;
    try {
      key = cert ? keyString(cert.publicKey) : null;
    } catch {
      key = null;
    }
    peerKeys.set(socket, key);
  }
  return peerKeys.get(socket) ?? null;
}

/** 32 bytes of the session's exported keying material under `label` (null without TLS). */
export function sessionBinding(ws: WebSocket, label: string): Buffer | null {
  const socket = tlsSocketOf(ws);
  if (!socket || socket.getProtocol() !== TLS_MIN_VERSION) return null;
  return socket.exportKeyingMaterial(32, `EXPORTER-nimble-${label}`, Buffer.alloc(0));
}
