// Ring all-reduce throughput over loopback WebSockets, side by side with a reference that
// pushes the same bytes over the same links with no ring (no summing, no dependency between
// neighbours): the transport's ceiling on this machine. Each rank runs in its own thread.
//
//   npm run build && node scripts/bench-ring.mjs [--sizes 2,3,4] [--mb 16] [--iters 5] [--json FILE]
import { writeFileSync } from "node:fs";
import os from "node:os";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { WebSocketServer } from "ws";
import { arg } from "./lib/args.mjs";
import { RingAllReduce, expectedBytesPerNode } from "../dist/collective/ring.js";
import { acceptRingPeer, connectRingPeer } from "../dist/net/link.js";
import { DEFAULT_CHUNK_BYTES, MAX_FRAME_BYTES, encodeChunk } from "../dist/protocol/frames.js";

const JOB = "bench";
const SECRET = "bench-secret";

if (isMainThread) {
  const sizes = arg("sizes", "2,3,4").split(",").map(Number);
  const mb = Number(arg("mb", "16"));
  const iters = Number(arg("iters", "5"));
  const jsonOut = arg("json", "");
  const elements = Math.floor((mb * 1024 * 1024) / 4);
  const rows = [];
  for (const size of sizes) rows.push(await runRing(size, elements, iters));
  console.log(`\nring all-reduce of ${mb} MiB float32 over loopback WebSockets, ${os.cpus().length} cores (${os.cpus()[0]?.model ?? "cpu"})`);
  console.log("N  per-node sent  ring s/op  busbw MB/s  reference s  ref MB/s  ring/ref");
  for (const r of rows) {
    console.log(
      `${String(r.n).padEnd(2)} ${(r.bytesPerNode / 1e6).toFixed(1).padStart(10)} MB  ${r.ringSeconds.toFixed(3).padStart(9)}  ${(r.busBandwidth / 1e6).toFixed(0).padStart(10)}  ${r.refSeconds.toFixed(3).padStart(11)}  ${(r.refBandwidth / 1e6).toFixed(0).padStart(8)}  ${r.ratio.toFixed(2).padStart(8)}`,
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

async function runRing(size, elements, iters) {
  const workers = Array.from({ length: size }, (_, rank) => new Worker(new URL(import.meta.url), { workerData: { rank, size, elements, iters } }));
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

async function rankMain({ rank, size, elements, iters }) {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0, path: "/ring", maxPayload: MAX_FRAME_BYTES, perMessageDeflate: false });
  await new Promise((r) => server.once("listening", r));
  const fromParent = [];
  const waiters = [];
  parentPort.on("message", (m) => (waiters.length ? waiters.shift()(m) : fromParent.push(m)));
  const next = () => new Promise((resolve) => (fromParent.length ? resolve(fromParent.shift()) : waiters.push(resolve)));
  // Each phase gets fresh links, so the reference's frames never reach the ring's listener.
  const accepted = [];
  const acceptWaiters = [];
  server.on("connection", (ws) =>
    acceptRingPeer(ws, { job: JOB, secret: SECRET, ranks: new Set([rank]) }, 5000).then(({ link }) =>
      acceptWaiters.length ? acceptWaiters.shift()(link) : accepted.push(link),
    ),
  );
  const nextAccepted = () => new Promise((resolve) => (accepted.length ? resolve(accepted.shift()) : acceptWaiters.push(resolve)));
  parentPort.postMessage({ port: server.address().port });
  const { ports } = await next();
  const to = (rank + 1) % size;
  const connect = async () => {
    const nextLink = await connectRingPeer(`ws://127.0.0.1:${ports[to]}/ring`, { job: JOB, secret: SECRET, from: rank, to });
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
}
