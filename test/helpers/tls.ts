/**
 * TLS for tests, as production has it: hosts with ephemeral identities, servers that
 * present their self-signed certificate, ring credentials signed by a test coordinator,
 * and the proofs a coordinator's hello carries.
 */
import { createServer, type Server } from "node:https";
import type { AddressInfo } from "node:net";
import WebSocket, { WebSocketServer, type ServerOptions } from "ws";
import { Authorizer, CONTROL_BINDING, PURPOSE, type RingJob } from "../../src/net/auth.js";
import { ephemeralIdentity, type Identity } from "../../src/identity/identity.js";
import { issueCredential, prove, type Credential } from "../../src/identity/proof.js";
import { sessionBinding, TLS_CLIENT_OPTIONS, tlsServerOptions } from "../../src/net/tls.js";
import { PROTOCOL_VERSION, type ToProvider } from "../../src/protocol/messages.js";

/** The coordinator every test job is signed by. */
export const TEST_COORDINATOR = ephemeralIdentity();

/** A WebSocket server over TLS with `identity`'s certificate, on a free loopback port. */
export async function startTlsServer(identity: Identity, opts: ServerOptions = {}): Promise<{ server: WebSocketServer; https: Server; port: number }> {
  const https = createServer(await tlsServerOptions(identity));
  const server = new WebSocketServer({ ...opts, server: https });
  await new Promise<void>((resolve) => https.listen(0, "127.0.0.1", () => resolve()));
  return { server, https, port: (https.address() as AddressInfo).port };
}

export async function closeTlsServer(s: { server: WebSocketServer; https: Server }): Promise<void> {
  for (const client of s.server.clients) client.terminate();
  await new Promise<void>((resolve) => s.server.close(() => resolve()));
  s.https.closeAllConnections();
  await new Promise<void>((resolve) => s.https.close(() => resolve()));
}

/** A ring member of `job` with its own identity and the test coordinator's credential for `ranks`. */
export function ringMember(job: string, ranks: number[], identity: Identity = ephemeralIdentity()) {
  const credential: Credential = issueCredential(TEST_COORDINATOR, job, identity.key, ranks);
  const auth = new Authorizer(identity, { token: null, allow: new Set([TEST_COORDINATOR.key]) });
  const ringJob: RingJob = { job, coordinatorKey: TEST_COORDINATOR.key, ranks: new Set(ranks) };
  return {
    identity,
    auth,
    credential,
    ringJob,
    hello: (from: number, to: number, epoch = 0) => (binding: Buffer) => auth.ringHello({ job, credential }, from, to, epoch, binding),
  };
}

/** A client WebSocket over TLS that checks nothing itself (tests check what they need). */
export function openTls(url: string, opts: WebSocket.ClientOptions = {}): WebSocket {
  return new WebSocket(url, { ...TLS_CLIENT_OPTIONS, ...opts });
}

/** A coordinator's hello on the TLS session of `ws`: signed by `identity`, with a token MAC when given. */
export function coordinatorHello(ws: WebSocket, identity: Identity = TEST_COORDINATOR, token?: string, version = PROTOCOL_VERSION): Extract<ToProvider, { t: "hello" }> {
  const binding = sessionBinding(ws, CONTROL_BINDING);
  if (!binding) throw new Error("not a TLS 1.3 connection");
  return { t: "hello", version, ...prove(identity, PURPOSE.coordinator, binding, { token }) };
}
