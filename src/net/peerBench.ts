import WebSocket from "ws";
import { z } from "zod";
import { ProtocolError, UserError, errorMessage } from "../errors.js";
import { KEY_PATTERN } from "../identity/identity.js";
import type { BenchHello } from "./auth.js";
import { afterLatency, keyProblem } from "./link.js";
import { sessionBinding, TLS_CLIENT_OPTIONS } from "./tls.js";

/**
 * Link measurement over the transport training uses: `/bench` on a provider (TLS), a
 * hello with a proof on the session first (net/auth.ts `admitBench`), then round trips
 * (latency) and a timed bulk upload (throughput). Messages are small JSON texts (binary
 * fields in base64); bulk data are binary frames the provider only counts.
 */
export const BENCH_FRAME_BYTES = 256 * 1024;
/** A bench upload is bounded so a client cannot make a provider read forever. */
export const MAX_BENCH_BYTES = 1024 * 1024 * 1024;

export interface PeerMeasurement {
  address: string;
  /** Round-trip times of small messages, milliseconds. */
  rtt_ms: { median: number; min: number; max: number; samples: number };
  /** Bulk upload rate to the peer: bytes it acknowledged / seconds until its acknowledgement. */
  upload_bytes_per_s: number;
  upload_bytes: number;
}

export const BENCH_BINDING = "bench";

const b64 = (n: number) =>
  z
    .string()
    .max(128)
    .transform((v) => Buffer.from(v, "base64"))
    .refine((b) => b.byteLength === n, `expected ${n} bytes`);
const benchHelloSchema = z
  .object({
    t: z.literal("hello"),
    key: z.string().regex(KEY_PATTERN),
    nonce: b64(32),
    sig: b64(64),
    mac: b64(32).optional(),
    job: z.string().max(256).optional(),
    credential: z.object({ ranks: z.array(z.number().int().min(0)).min(1).max(4096), sig: b64(64) }).optional(),
  })
  .strict();

function helloText(hello: BenchHello): string {
  const b = (v: Uint8Array) => Buffer.from(v).toString("base64");
  return JSON.stringify({
    t: "hello",
    key: hello.key,
    nonce: b(hello.nonce),
    sig: b(hello.sig),
    ...(hello.mac ? { mac: b(hello.mac) } : {}),
    ...(hello.job !== undefined ? { job: hello.job } : {}),
    ...(hello.credential ? { credential: { ranks: hello.credential.ranks, sig: b(hello.credential.sig) } } : {}),
  });
}

type BenchMessage =
  | { t: "hello" }
  | { t: "ping"; i: number }
  | { t: "bulk"; bytes: number }
  | { t: "pong"; i: number }
  | { t: "ready" }
  | { t: "got"; bytes: number };

function parse(data: WebSocket.RawData, isBinary: boolean): BenchMessage {
  if (isBinary) throw new ProtocolError("unexpected binary frame");
  let m: unknown;
  try {
    m = JSON.parse(String(data));
  } catch {
    throw new ProtocolError("bench message is not JSON");
  }
  const t = (m as { t?: unknown }).t;
  if (typeof m !== "object" || m === null || typeof t !== "string") throw new ProtocolError("bench message has no type");
  return m as BenchMessage;
}

/**
 * Provider side of `/bench`: authenticate, answer pings, count a bulk upload. `latencyMs`
 * (the --latency testing aid): each message is handled that long after it arrived, as on
 * ring and control links.
 */
export function servePeerBench(ws: WebSocket, accepts: (hello: BenchHello, binding: Buffer | null) => boolean, latencyMs?: number): void {
  let authed = false;
  let expecting = 0;
  let received = 0;
  const fail = (code: number, why: string) => ws.close(code, why);
  const timer = setTimeout(() => fail(4003, "no hello"), 10_000);
  ws.on("message", (data, isBinary) => afterLatency(latencyMs, () => handle(data, isBinary)));
  const handle = (data: WebSocket.RawData, isBinary: boolean) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    if (isBinary) {
      if (!authed || expecting === 0) return fail(4000, "unexpected data");
      received += (data as Buffer).length;
      if (received >= expecting) {
        ws.send(JSON.stringify({ t: "got", bytes: received }));
        expecting = 0;
        received = 0;
      }
      return;
    }
    let m: BenchMessage;
    try {
      m = parse(data, false);
    } catch {
      return fail(4000, "invalid message");
    }
    if (!authed) {
      clearTimeout(timer);
      const hello = benchHelloSchema.safeParse(m);
      if (!hello.success || !accepts(hello.data, sessionBinding(ws, BENCH_BINDING))) return fail(4001, "not admitted");
      authed = true;
      ws.send(JSON.stringify({ t: "ready" }));
      return;
    }
    if (m.t === "ping" && Number.isInteger(m.i)) ws.send(JSON.stringify({ t: "pong", i: m.i }));
    else if (m.t === "bulk" && Number.isInteger(m.bytes) && m.bytes > 0 && m.bytes <= MAX_BENCH_BYTES) {
      expecting = m.bytes;
      received = 0;
    } else fail(4000, "invalid message");
  };
  ws.on("close", () => clearTimeout(timer));
  ws.on("error", () => {});
}

/** Client side: measure latency and upload throughput to a provider's `/bench`. */
export async function measurePeer(
  address: string,
  makeHello: (binding: Buffer) => BenchHello,
  opts: { pings?: number; bytes?: number; throttle?: (bytes: number) => Promise<void>; expectKey?: string; latencyMs?: number } = {},
): Promise<PeerMeasurement> {
  const withScheme = /^wss?:\/\//.test(address) ? address : `wss://${address}`;
  const url = new URL(withScheme);
  url.pathname = "/bench";
  const ws = new WebSocket(url.toString(), { ...TLS_CLIENT_OPTIONS, perMessageDeflate: false, handshakeTimeout: 10_000 });
  const inbox: BenchMessage[] = [];
  const waiters: { resolve: (m: BenchMessage) => void; reject: (err: Error) => void }[] = [];
  let closed: Error | null = null;
  const next = () =>
    new Promise<BenchMessage>((resolve, reject) => {
      const m = inbox.shift();
      if (m) resolve(m);
      else if (closed) reject(closed);
      else waiters.push({ resolve, reject });
    });
  await new Promise<void>((resolve, reject) => {
    ws.once("open", () => {
      const problem = keyProblem(ws, opts.expectKey);
      if (problem) {
        ws.terminate();
        reject(new UserError(`Refused ${address}: ${problem}`));
      } else resolve();
    });
    ws.once("error", (err) => reject(new UserError(`Cannot reach ${address}: ${errorMessage(err)}`, "Is `nimble provide` running there?")));
  });
  ws.on("message", (data, isBinary) =>
    afterLatency(opts.latencyMs, () => {
      let m: BenchMessage;
      try {
        m = parse(data, isBinary);
      } catch {
        ws.terminate();
        return;
      }
      const w = waiters.shift();
      if (w) w.resolve(m);
      else inbox.push(m);
    }),
  );
  ws.on("close", (code, reason) => {
    closed = new UserError(
      code === 4001 ? `${address} refused the bench: wrong token or key` : `${address} closed the bench connection (${code} ${reason})`,
      code === 4001 ? "Pass the token `nimble provide` printed (--token or NIMBLE_TOKEN), or have its owner --allow your key (`nimble id`)." : undefined,
    );
    for (const w of waiters.splice(0)) w.reject(closed);
  });
  try {
    const binding = sessionBinding(ws, BENCH_BINDING);
    if (!binding) throw new UserError(`${address} is not speaking TLS 1.3: refusing to authenticate to it`);
    ws.send(helloText(makeHello(binding)));
    const hello = await withTimeout(next(), 10_000, address);
    if (hello.t !== "ready") throw new UserError(`${address} answered the bench hello with ${hello.t}`);
    const rtts: number[] = [];
    for (let i = 0; i < (opts.pings ?? 20); i++) {
      const t0 = performance.now();
      ws.send(JSON.stringify({ t: "ping", i }));
      const pong = await withTimeout(next(), 10_000, address);
      if (pong.t !== "pong" || pong.i !== i) throw new UserError(`${address} answered ping ${i} with ${JSON.stringify(pong)}`);
      rtts.push(performance.now() - t0);
    }
    const total = opts.bytes ?? 32 * 1024 * 1024;
    const frame = new Uint8Array(BENCH_FRAME_BYTES);
    ws.send(JSON.stringify({ t: "bulk", bytes: total }));
    const t0 = performance.now();
    for (let sent = 0; sent < total; ) {
      const n = Math.min(frame.length, total - sent);
      await opts.throttle?.(n);
      await new Promise<void>((resolve, reject) => ws.send(frame.subarray(0, n), (err) => (err ? reject(err) : resolve())));
      sent += n;
    }
    const got = await withTimeout(next(), 120_000, address);
    const seconds = (performance.now() - t0) / 1000;
    if (got.t !== "got" || got.bytes !== total) throw new UserError(`${address} acknowledged ${JSON.stringify(got)} of ${total} bytes`);
    rtts.sort((a, b) => a - b);
    return {
      address,
      rtt_ms: { median: rtts[Math.floor(rtts.length / 2)], min: rtts[0], max: rtts[rtts.length - 1], samples: rtts.length },
      upload_bytes_per_s: total / seconds,
      upload_bytes: total,
    };
  } finally {
    ws.close();
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, address: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new UserError(`${address} did not answer within ${ms / 1000} s`)), ms);
    p.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}
