// One rank of Nimble's ring for bench-sim's validation runs, started by scripts/lib/simValidate.mjs
// inside its network namespace (`ip netns exec nsim-rK node scripts/sim-rank.mjs`). It links over
// TLS with a hello as providers do, and talks to the parent in JSON lines:
//   -> {"ready":true}                         its /ring server listens on SIM_RANK.ips[rank]:port
//   <- {"cmd":"run","latencyMs","sizes","iters"}  link the ring (frames delayed latencyMs one way,
//                                             as `nimble provide --latency` does), one warm-up and
//   -> {"results":[{"bytes","seconds":[...]}]}   `iters` timed all-reduces per size
//   <- {"cmd":"close"}  -> {"closed":true}      unlink, once every rank has answered
//   <- {"cmd":"exit"}
import { createPrivateKey } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer } from "node:https";
import { createInterface } from "node:readline";
import { WebSocketServer } from "ws";
import { RingAllReduce } from "../dist/collective/ring.js";
import { Authorizer } from "../dist/net/auth.js";
import { identityFromKey } from "../dist/identity/identity.js";
import { issueCredential } from "../dist/identity/proof.js";
import { acceptRingPeer, connectRingPeer } from "../dist/net/link.js";
import { tlsServerOptions } from "../dist/net/tls.js";
import { MAX_FRAME_BYTES } from "../dist/protocol/frames.js";

const JOB = "bench-sim";
const setup = JSON.parse(process.env.SIM_RANK ?? "null");
if (!setup) throw new Error("SIM_RANK is not set (scripts/lib/simValidate.mjs starts this)");
const { rank, size, ips, port, keysFile } = setup;
const keys = JSON.parse(readFileSync(keysFile, "utf8"));
const coordinator = identityFromKey(createPrivateKey(keys.coordinator));
const identities = keys.ranks.map((pem) => identityFromKey(createPrivateKey(pem)));
const identity = identities[rank];
const credential = issueCredential(coordinator, JOB, identity.key, [rank]);
const auth = new Authorizer(identity, { token: null, allow: new Set([coordinator.key]) });
const say = (m) => process.stdout.write(`${JSON.stringify(m)}\n`);

const https = createServer(await tlsServerOptions(identity));
await new Promise((resolve) => https.listen(port, ips[rank], resolve));
const server = new WebSocketServer({ server: https, path: "/ring", maxPayload: MAX_FRAME_BYTES, perMessageDeflate: false });
// Connections from prev, in order: prev may link for a run before this rank has read its order.
const incoming = [];
let onPrev = null;
server.on("connection", (ws) => (onPrev ? onPrev(ws) : incoming.push(ws)));
say({ ready: true });

const to = (rank + 1) % size;
const deadline = (ms) => Date.now() + ms;

/** Connect to the next rank, retrying while its server is not up yet (bounded). */
async function connectNext(latencyMs) {
  const until = deadline(30_000);
  for (;;) {
    try {
      return await connectRingPeer(`wss://${ips[to]}:${port}/ring`, (binding) => auth.ringHello({ job: JOB, credential }, rank, to, 0, binding), {
        expectKey: identities[to].key,
        latencyMs,
      });
    } catch (err) {
      if (Date.now() > until) throw err;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

async function run({ latencyMs, sizes, iters }) {
  const prevLink = new Promise((resolve, reject) => {
    const accept = (ws) => {
      onPrev = null;
      acceptRingPeer(ws, (hello, binding) => auth.admitRingPeer(hello, binding, { job: JOB, coordinatorKey: coordinator.key, ranks: new Set([rank]) }), 10_000, { latencyMs }).then(
        ({ link }) => resolve(link),
        reject,
      );
    };
    if (incoming.length) accept(incoming.shift());
    else onPrev = accept;
  });
  const next = await connectNext(latencyMs);
  const prev = await prevLink;
  const ring = new RingAllReduce({ rank, size, next, prev });
  const results = [];
  for (const bytes of sizes) {
    const data = new Float32Array(Math.ceil(bytes / 4));
    data.fill(rank + 1);
    await ring.allReduce(data); // warm-up; also the barrier before timing
    const seconds = [];
    for (let i = 0; i < iters; i++) {
      data.fill(rank + 1);
      const t0 = performance.now();
      await ring.allReduce(data);
      seconds.push((performance.now() - t0) / 1000);
    }
    const expected = (size * (size + 1)) / 2;
    if (data[0] !== expected || data[data.length - 1] !== expected) throw new Error(`rank ${rank}: wrong sum at ${bytes} bytes`);
    results.push({ bytes, seconds });
  }
  // Closed on the parent's word, once every rank has finished: a rank that closed as soon as
  // its own last op settled would cut off a neighbour still receiving that op's last chunks.
  open = { ring, next, prev };
  return results;
}

let open = null;

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const msg = JSON.parse(line);
  if (msg.cmd === "exit") break;
  if (msg.cmd === "run") say({ results: await run(msg) });
  if (msg.cmd === "close") {
    open?.ring.close();
    open?.next.close();
    open?.prev.close();
    open = null;
    say({ closed: true });
  }
}
server.close();
https.close();
process.exit(0);
