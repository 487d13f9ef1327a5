// One rank of `npm run bench:ring`, in a process of its own (as a provider runs it), started
// by scripts/bench-ring.mjs. Talks JSON lines: it prints {port, key} once listening; reads
// {peers, coordinatorPem}, forms the ring and prints {linked}; for each {run: {elements,
// iters, codec}} it prints {seconds, cpuSeconds, correct}; {exit} ends it.
//
// --mode tls: the data plane as providers make it: this rank's identity in a self-signed TLS
//   1.3 certificate (net/tls.ts), the coordinator's credential, the ring formed by a Mesh
//   (collective/mesh.ts) with proofs bound to each TLS session, incoming links admitted by
//   readRingHello/admitRingHello as the provider's server does.
// --mode plain: plain ws, no hello, no encryption: only the benchmark's reference row.
import { createPrivateKey } from "node:crypto";
import { createServer as createHttpServer } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { createInterface } from "node:readline";
import { WebSocketServer } from "ws";
import { pathToFileURL } from "node:url";
import { arg } from "./lib/args.mjs";

// NIMBLE_BENCH_DIST: another build of Nimble (e.g. an earlier commit's dist/) to measure in
// the same alternation, through `bench-ring.mjs --variants`.
const dist = process.env.NIMBLE_BENCH_DIST ? pathToFileURL(`${process.env.NIMBLE_BENCH_DIST.replace(/\/$/, "")}/`) : new URL("../dist/", import.meta.url);
const load = (file) => import(new URL(file, dist).href);
const { Mesh } = await load("collective/mesh.js");
const { RingAllReduce } = await load("collective/ring.js");
const { Authorizer } = await load("net/auth.js");
const { ephemeralIdentity, identityFromKey } = await load("identity/identity.js");
const { issueCredential } = await load("identity/proof.js");
const { admitRingHello, connectLink, FrameLink, readRingHello } = await load("net/link.js");
const { tlsServerOptions } = await load("net/tls.js");
const { MAX_FRAME_BYTES } = await load("protocol/frames.js");

const JOB = "bench-ring";
const rank = Number(arg("rank", "0"));
const world = Number(arg("world", "4"));
const mode = arg("mode", "tls");
const host = arg("host", "127.0.0.1");
const say = (m) => process.stdout.write(`${JSON.stringify(m)}\n`);
const die = (why) => {
  process.stderr.write(`rank ${rank} (${mode}): ${why}\n`);
  process.exit(1);
};

const identity = ephemeralIdentity();
const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME_BYTES, perMessageDeflate: false });
const server = mode === "tls" ? createHttpsServer(await tlsServerOptions(identity)) : createHttpServer();
let onIncoming = () => {};
server.on("upgrade", (req, socket, head) => {
  if (new URL(req.url, "http://x").pathname !== "/ring") return socket.destroy();
  wss.handleUpgrade(req, socket, head, (ws) => onIncoming(ws));
});
await new Promise((r) => server.listen(0, host, r));
const scheme = mode === "tls" ? "wss" : "ws";
say({ port: server.address().port, url: `${scheme}://${host}:${server.address().port}/ring`, key: identity.key });

const input = createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();
const nextMessage = async () => {
  const { value, done } = await lines.next();
  if (done) process.exit(0); // the parent went away
  return JSON.parse(value);
};

const { peers, coordinatorPem } = await nextMessage();
const ring = await (mode === "tls" ? tlsRing(peers, coordinatorPem) : plainRing(peers));
say({ linked: true });

for (;;) {
  const msg = await nextMessage();
  if (msg.exit) break;
  const { elements, iters, codec = "f32" } = msg.run;
  const data = new Float32Array(elements).fill(rank + 1);
  await ring.allReduce(data, { codec }); // warm-up, and the sum is checked
  const want = (world * (world + 1)) / 2;
  const correct = data[0] === want && data[elements - 1] === want;
  const start = performance.now();
  const cpu = process.cpuUsage();
  for (let i = 0; i < iters; i++) await ring.allReduce(data, { codec });
  const used = process.cpuUsage(cpu);
  say({ seconds: (performance.now() - start) / 1000, cpuSeconds: (used.user + used.system) / 1e6, correct });
}
ring.close();
server.close();
process.exit(0);

/** The ring as a provider forms it: a Mesh over TLS links with hellos and credentials. */
async function tlsRing(peers, coordinatorPem) {
  const coordinator = identityFromKey(createPrivateKey(coordinatorPem));
  const credential = issueCredential(coordinator, JOB, identity.key, [rank]);
  const auth = new Authorizer(identity, { token: null, allow: new Set([coordinator.key]) });
  return new Promise((resolve) => {
    const mesh = new Mesh(
      {
        local: [rank],
        members: [...Array(world).keys()],
        peers: new Map(peers.map((p, r) => [r, { url: p.url, key: p.key }])),
        hello: (from, to, epoch, binding) => auth.ringHello({ job: JOB, credential }, from, to, epoch, binding),
        heartbeatMs: 60_000,
      },
      {
        linked: (_rank, _epoch, r) => resolve(r),
        lost: (_rank, _epoch, reason) => die(`ring lost: ${reason}`),
        fail: (message) => die(message),
        log: () => {},
        track: () => {},
      },
    );
    onIncoming = (ws) =>
      readRingHello(ws, 10_000)
        .then((arrived) => mesh.accept(admitRingHello(arrived, (h, binding) => auth.admitRingPeer(h, binding, { job: JOB, coordinatorKey: coordinator.key, ranks: new Set([rank]) }))))
        .catch((err) => die(`incoming ring link: ${err.message}`));
    mesh.start();
  });
}

/** Plain ws links straight into a RingAllReduce (the reference row without TLS). */
async function plainRing(peers) {
  const prev = new Promise((resolve) => (onIncoming = (ws) => resolve(new FrameLink(ws))));
  const next = await connectLink(peers[(rank + 1) % world].url);
  return new RingAllReduce({ rank, size: world, next, prev: await prev });
}
