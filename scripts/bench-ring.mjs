// Ring all-reduce throughput over loopback WebSockets, side by side with a reference that
// pushes the same bytes over the same links with no ring (no summing, no dependency between
// neighbours): the transport's ceiling on this machine. Each rank runs in its own thread.
// `--tls both` (the default) runs every size twice in alternation: over plain ws (no hello)
// and over TLS 1.3 as providers link (identities, credentials, the hello's proof).
//
//   npm run build && node scripts/bench-ring.mjs [--sizes 2,3,4] [--mb 16] [--iters 5] [--tls both|on|off] [--json FILE]
import { createPrivateKey } from "node:crypto";
import { writeFileSync } from "node:fs";
import { createServer } from "node:https";
import os from "node:os";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { WebSocketServer } from "ws";
import { arg } from "./lib/args.mjs";
import { RingAllReduce, expectedBytesPerNode } from "../dist/collective/ring.js";
import { Authorizer } from "../dist/net/auth.js";
import { ephemeralIdentity, identityFromKey } from "../dist/identity/identity.js";
import { acceptRingPeer, connectLink, connectRingPeer, FrameLink } from "../dist/net/link.js";
import { issueCredential } from "../dist/identity/proof.js";
import { tlsServerOptions } from "../dist/net/tls.js";
import { DEFAULT_CHUNK_BYTES, MAX_FRAME_BYTES, encodeChunk } from "../dist/protocol/frames.js";

const JOB = "bench";

if (isMainThread) {
  const sizes = arg("sizes", "2,3,4").split(",").map(Number);
  const mb = Number(arg("mb", "16"));
  const iters = Number(arg("iters", "5"));
  const tlsModes = { both: [false, true], on: [true], off: [false] }[arg("tls", "both")];
  if (!tlsModes) throw new Error("--tls is both, on or off");
  const jsonOut = arg("json", "");
  const elements = Math.floor((mb * 1024 * 1024) / 4);
  const rows = [];
  for (const size of sizes) for (const tls of tlsModes) rows.push(await runRing(size, elements, iters, tls));
  console.log(`\nring all-reduce of ${mb} MiB float32 over loopback WebSockets, ${os.cpus().length} cores (${os.cpus()[0]?.model ?? "cpu"}), load ${os.loadavg()[0].toFixed(2)}`);
  console.log("N  link  per-node sent  ring s/op  busbw MB/s  reference s  ref MB/s  ring/ref  vs plain");
  for (const r of rows) {
    const plain = rows.find((p) => p.n === r.n && !p.tls);
    console.log(
      `${String(r.n).padEnd(2)} ${(r.tls ? "tls" : "ws").padEnd(4)} ${(r.bytesPerNode / 1e6).toFixed(1).padStart(10)} MB  ${r.ringSeconds.toFixed(3).padStart(9)}  ${(r.busBandwidth / 1e6).toFixed(0).padStart(10)}  ${r.refSeconds.toFixed(3).padStart(11)}  ${(r.refBandwidth / 1e6).toFixed(0).padStart(8)}  ${r.ratio.toFixed(2).padStart(8)}  ${plain && r.tls ? (r.busBandwidth / plain.busBandwidth).toFixed(2).padStart(8) : "".padStart(8)}`,
    );
  }
  if (rows.some((r) => !r.correct)) {
    console.error("ring all-reduce gave a wrong sum");
    process.exit(1);
  }
  if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ mb, iters, cores: os.cpus().length, rows }, null, 2));
} else {
  await rankMain(workerData);
}

async function runRing(size, elements, iters, tls) {
  const coordinator = ephemeralIdentity();
  const coordinatorPem = coordinator.privateKey.export({ format: "pem", type: "pkcs8" });
  const workers = Array.from({ length: size }, (_, rank) => new Worker(new URL(import.meta.url), { workerData: { rank, size, elements, iters, tls, coordinatorPem } }));
  const inbox = workers.map((w) => {
    const queue = [];
    const waiters = [];
    w.on("message", (m) => (waiters.length ? waiters.shift()(m) : queue.push(m)));
    w.on("error", (e) => {
      console.error(e);
      process.exit(1);
    });
    return () => new Promise((resolve) => (queue.length ? resolve(queue.shift()) : waiters.push(resolve)));
  });
  const ports = await Promise.all(inbox.map((next) => next().then((m) => m.port)));
  workers.forEach((w) => w.postMessage({ ports }));
  // Barriers: connected, then each phase's result.
  await Promise.all(inbox.map((next) => next()));
  workers.forEach((w) => w.postMessage({ go: "ring" }));
  const ring = await Promise.all(inbox.map((next) => next()));
  workers.forEach((w) => w.postMessage({ go: "reference" }));
  const ref = await Promise.all(inbox.map((next) => next()));
  await Promise.all(workers.map((w) => w.terminate()));
  const ringSeconds = Math.max(...ring.map((r) => r.seconds)) / iters;
  const refSeconds = Math.max(...ref.map((r) => r.seconds)) / iters;
  const bytesPerNode = expectedBytesPerNode(elements, size, 0);
  return {
    n: size,
    tls,
    bytes: elements * 4,
    bytesPerNode,
    ringSeconds,
    refSeconds,
    // NCCL's bus bandwidth: what each link carried per second.
    busBandwidth: bytesPerNode / ringSeconds,
    refBandwidth: bytesPerNode / refSeconds,
    ratio: ringSeconds / refSeconds,
    correct: ring.every((r) => r.correct),
  };
}

/** Over TLS, as providers link: this rank's identity, the coordinator's credential, proofs in the hello. */
async function tlsRank(rank, coordinatorPem) {
  const identity = ephemeralIdentity();
  const coordinator = identityFromKey(createPrivateKey(coordinatorPem));
  const credential = issueCredential(coordinator, JOB, identity.key, [rank]);
  const auth = new Authorizer(identity, { token: null, allow: new Set([coordinator.key]) });
  const https = createServer(await tlsServerOptions(identity));
  await new Promise((r) => https.listen(0, "127.0.0.1", r));
  const server = new WebSocketServer({ server: https, path: "/ring", maxPayload: MAX_FRAME_BYTES, perMessageDeflate: false });
  return {
    port: https.address().port,
    key: identity.key,
    server,
    close: () => https.close(),
    accept: (ws) => acceptRingPeer(ws, (hello, binding) => auth.admitRingPeer(hello, binding, { job: JOB, coordinatorKey: coordinator.key, ranks: new Set([rank]) }), 5000),
    connect: (port, key, to) =>
      connectRingPeer(`wss://127.0.0.1:${port}/ring`, (binding) => auth.ringHello({ job: JOB, credential }, rank, to, 0, binding), { expectKey: key }),
  };
}

/** Plain ws, no hello: the transport without encryption, for comparison. */
async function plainRank() {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0, path: "/ring", maxPayload: MAX_FRAME_BYTES, perMessageDeflate: false });
  await new Promise((r) => server.once("listening", r));
  return {
    port: server.address().port,
    key: "",
    server,
    close: () => server.close(),
    accept: async (ws) => ({ link: new FrameLink(ws) }),
    connect: (port) => connectLink(`ws://127.0.0.1:${port}/ring`),
  };
}

async function rankMain({ rank, size, elements, iters, tls, coordinatorPem }) {
  const host = tls ? await tlsRank(rank, coordinatorPem) : await plainRank();
  const { server } = host;
  const fromParent = [];
  const waiters = [];
  parentPort.on("message", (m) => (waiters.length ? waiters.shift()(m) : fromParent.push(m)));
  const next = () => new Promise((resolve) => (fromParent.length ? resolve(fromParent.shift()) : waiters.push(resolve)));
  // Each phase gets fresh links, so the reference's frames never reach the ring's listener.
  const accepted = [];
  const acceptWaiters = [];
  server.on("connection", (ws) =>
    host.accept(ws).then(({ link }) => (acceptWaiters.length ? acceptWaiters.shift()(link) : accepted.push(link))),
  );
  const nextAccepted = () => new Promise((resolve) => (accepted.length ? resolve(accepted.shift()) : acceptWaiters.push(resolve)));
  parentPort.postMessage({ port: { port: host.port, key: host.key } });
  const { ports } = await next();
  const to = (rank + 1) % size;
  const connect = async () => {
    const nextLink = await host.connect(ports[to].port, ports[to].key, to);
    return { nextLink, prev: await nextAccepted() };
  };
  let { nextLink, prev } = await connect();
  parentPort.postMessage({ connected: true });

  await next();
  const ring = new RingAllReduce({ rank, size, next: nextLink, prev });
  const data = new Float32Array(elements);
  data.fill(rank + 1);
  await ring.allReduce(data); // warm-up
  const start = performance.now();
  for (let i = 0; i < iters; i++) {
    data.fill(rank + 1);
    await ring.allReduce(data);
  }
  const seconds = (performance.now() - start) / 1000;
  const expected = (size * (size + 1)) / 2;
  parentPort.postMessage({ seconds, correct: data[0] === expected && data[elements - 1] === expected });

  // Reference: the same bytes per node, in the same frame size, straight to the next rank.
  await next();
  ring.close();
  ({ nextLink, prev } = await connect());
  const perNode = expectedBytesPerNode(elements, size, rank);
  const chunkElems = DEFAULT_CHUNK_BYTES / 4;
  const payload = new Float32Array(chunkElems);
  const total = perNode * iters;
  // Segments differ by one element between ranks: expect what the previous rank sends.
  const incoming = expectedBytesPerNode(elements, size, (rank - 1 + size) % size) * iters;
  let received = 0;
  const done = new Promise((resolve) => {
    prev.onFrame((bytes) => {
      received += bytes.byteLength - 24;
      if (received >= incoming) resolve();
    });
  });
  const begin = performance.now();
  let sent = 0;
  for (let chunk = 0; sent < total; chunk++) {
    const count = Math.min(chunkElems, (total - sent) / 4);
    await nextLink.send(encodeChunk({ phase: 0, op: 0, chunk, offset: 0, count }, payload.subarray(0, count)));
    sent += count * 4;
  }
  await done;
  parentPort.postMessage({ seconds: (performance.now() - begin) / 1000 });
  nextLink.close();
  server.close();
  host.close();
}
