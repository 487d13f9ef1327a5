/**
 * A provider against outsiders (issue "Trust 1 of 3"): nothing large is read before a peer
 * authenticates, connections waiting to authenticate are capped, wrong tokens are
 * rate-limited, and a ring connection without a job is not read past its hello.
 */
import net from "node:net";
import tls from "node:tls";
import { ephemeralIdentity } from "../../../src/identity/identity.js";
import { coordinatorHello, openTls, ringMember, TEST_COORDINATOR } from "../../helpers/tls.js";
import { afterEach, describe, expect, it } from "vitest";
import WebSocket from "ws";
import { Provider, type ProviderEvent } from "../../../src/job/provider/index.js";
import { encodeControl } from "../../../src/protocol/frames.js";
import { decodeToCoordinator, encodeMessage, PROTOCOL_VERSION, type ToCoordinator } from "../../../src/protocol/messages.js";
import type { PythonEnv } from "../../../src/runtime/python.js";

const TOKEN = "bounds-test-token";
const PROVIDER = ephemeralIdentity();
// No job starts in these tests: the interpreter is never run.
const python = { python: "python3", pythonVersion: "3.11", torchVersion: "2.13.0", source: "managed" } as unknown as PythonEnv;

let provider: Provider | null = null;
let events: ProviderEvent[] = [];
let port = 0;
const sockets: WebSocket[] = [];

afterEach(async () => {
  for (const ws of sockets.splice(0)) ws.terminate();
  await provider?.close();
  provider = null;
});

async function start(allow?: string[]) {
  events = [];
  provider = new Provider({ host: "127.0.0.1", port: 0, identity: PROVIDER, token: TOKEN, allow, python, devices: [{ id: "cpu", kind: "cpu", name: "cpu" }], threads: 1, onEvent: (e) => events.push(e) });
  port = (await provider.start()).port;
}

function open(path = "/control", localAddress = "127.0.0.1"): Promise<{ ws: WebSocket; messages: ToCoordinator[]; closed: Promise<{ code: number; reason: string }> }> {
  const ws = openTls(`wss://127.0.0.1:${port}${path}`, { maxPayload: 1 << 30, localAddress });
  sockets.push(ws);
  const messages: ToCoordinator[] = [];
  ws.on("message", (data) => messages.push(decodeToCoordinator(data, "provider")));
  ws.on("error", () => {});
  const closed = new Promise<{ code: number; reason: string }>((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
  return new Promise((resolve, reject) => {
    ws.once("open", () => resolve({ ws, messages, closed }));
    ws.once("error", reject);
  });
}

async function welcomed(localAddress = "127.0.0.1"): Promise<boolean> {
  const c = await open("/control", localAddress);
  c.ws.send(encodeMessage(coordinatorHello(c.ws, TEST_COORDINATOR, TOKEN)));
  for (let i = 0; i < 100 && c.messages.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
  c.ws.close();
  return c.messages[0]?.t === "welcome";
}

describe("a provider before anyone authenticates", () => {
  it("closes a connection whose first message is larger than a hello, without decoding it (1009), and stays up", async () => {
    await start();
    const c = await open();
    // 2 MiB of msgpack that decodes into many empty arrays: what took a provider to an out-of-memory abort.
    const bomb = Buffer.alloc(2 * 1024 * 1024, 0x90);
    bomb[0] = 0xdd; // array32 header ...
    bomb.writeUInt32BE(bomb.length - 5, 1); // ... of that many fixarray(0) elements
    c.ws.send(bomb);
    expect((await c.closed).code).toBe(1009);
    expect(await welcomed()).toBe(true);
  });

  it("caps the connections waiting to authenticate from one address, and serves again once they go", async () => {
    await start();
    const idle = await Promise.all(Array.from({ length: 64 }, () => open()));
    const over = await open();
    expect((await over.closed).code).toBe(1013);
    expect(events.some((e) => e.type === "log" && /too many connections waiting to authenticate/.test(e.line))).toBe(true);
    for (const c of idle) c.ws.close();
    await Promise.all(idle.map((c) => c.closed));
    await new Promise((r) => setTimeout(r, 50));
    expect(await welcomed()).toBe(true);
  });

  it("stays responsive beside 1,000 idle TCP connections, then closes them, slowloris headers and silent WebSockets", async () => {
    await start();
    const closedAt = (socket: net.Socket | tls.TLSSocket) => new Promise<void>((resolve) => socket.on("close", () => resolve()));
    const idle = Array.from({ length: 1000 }, () => net.connect(port, "127.0.0.1").on("error", () => {}));
    const idleClosed = Promise.all(idle.map(closedAt));
    // Slowloris: TLS set up, then a header line every 200 ms, never the blank line that ends them.
    const slow = tls.connect({ port, host: "127.0.0.1", rejectUnauthorized: false }).on("error", () => {});
    const slowClosed = closedAt(slow);
    const drip = setInterval(() => slow.writable && slow.write(slow.bytesWritten === 0 ? "GET /control HTTP/1.1\r\n" : "X-Slow: 1\r\n"), 200);
    const silent = await Promise.all(Array.from({ length: 8 }, () => open()));
    // Meanwhile, a coordinator from another address is served at once.
    expect(await welcomed("127.0.0.2")).toBe(true);
    expect(idle.filter((s) => s.destroyed)).toEqual([]); // served while all 1,000 were still held
    // All closed by the provider (the test's time limit bounds when).
    const [, , silentCodes] = await Promise.all([idleClosed, slowClosed, Promise.all(silent.map((c) => c.closed))]);
    clearInterval(drip);
    expect(silentCodes.map((c) => c.code)).toEqual(Array(8).fill(4003));
  }, 40_000);

  it("refuses hellos unread after repeated wrong tokens or keys from an address, and says so", async () => {
    await start();
    for (let i = 0; i < 5; i++) {
      const c = await open();
      c.ws.send(encodeMessage(coordinatorHello(c.ws, TEST_COORDINATOR, `wrong-${i}`)));
      expect((await c.closed).code).toBe(4001);
    }
    const right = await open();
    right.ws.send(encodeMessage(coordinatorHello(right.ws, TEST_COORDINATOR, TOKEN)));
    expect((await right.closed).code).toBe(4001);
    expect(right.messages).toEqual([{ t: "reject", reason: "too many wrong tokens or keys from this address; try again later" }]);
  });

  it("in key mode, rate-limits wrong keys the same way", async () => {
    await start([TEST_COORDINATOR.key]);
    for (let i = 0; i < 5; i++) {
      const c = await open();
      c.ws.send(encodeMessage(coordinatorHello(c.ws, ephemeralIdentity())));
      expect((await c.closed).code).toBe(4001);
      expect(c.messages).toEqual([{ t: "reject", reason: "key not allowed" }]);
    }
    const right = await open();
    right.ws.send(encodeMessage(coordinatorHello(right.ws, TEST_COORDINATOR)));
    expect((await right.closed).code).toBe(4001);
    expect(right.messages).toEqual([{ t: "reject", reason: "too many wrong tokens or keys from this address; try again later" }]);
    // Another address is not held back by this one's mistakes.
    const other = await open("/control", "127.0.0.3");
    other.ws.send(encodeMessage(coordinatorHello(other.ws, TEST_COORDINATOR)));
    for (let i = 0; i < 100 && other.messages.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
    expect(other.messages[0]?.t).toBe("welcome");
  });

  it("reads nothing on /ring without a job but the hello: what follows stays with the sender", async () => {
    await start();
    const c = await open("/ring");
    c.ws.send(encodeControl({ t: "hello", ...ringMember("nope", [0]).hello(0, 0)(Buffer.alloc(32)) }));
    // 32 MiB behind the hello, in frames each small enough to pass: a provider that read them would queue them for a minute.
    const chunk = Buffer.alloc(32 * 1024, 7);
    for (let i = 0; i < 1024; i++) c.ws.send(chunk);
    await new Promise((r) => setTimeout(r, 500));
    expect(c.ws.readyState).toBe(WebSocket.OPEN);
    expect(c.ws.bufferedAmount).toBeGreaterThan(16 * 1024 * 1024);
  });

  it("closes a ring connection whose first frame is larger than a hello (1009)", async () => {
    await start();
    const c = await open("/ring");
    c.ws.send(Buffer.alloc(256 * 1024, 1));
    expect((await c.closed).code).toBe(1009);
  });
});
