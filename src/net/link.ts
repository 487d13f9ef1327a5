/**
 * FrameLink: one WebSocket carrying binary data-plane frames, with send-side
 * backpressure, and the helpers that open and authenticate ring connections.
 */
import WebSocket from "ws";
import { ProtocolError } from "../errors.js";
import { decodeFrame, encodeControl, MAX_FRAME_BYTES, type HelloMessage } from "../protocol/frames.js";
import { fingerprint } from "../identity/identity.js";
import { peerKey, sessionBinding, TLS_CLIENT_OPTIONS } from "./tls.js";

/** Bytes handed to ws whose send callback has not fired, above which `send` waits. */
export const DEFAULT_HIGH_WATER_MARK = 4 * 1024 * 1024;

/** Close codes used on ring links (docs/protocol.md). */
export const CLOSE_AUTH_FAILED = 4001; // bad hello: not a member of the job, malformed first frame
export const CLOSE_BAD_RANK = 4002; // hello names a rank this provider does not host, or no hello in time
export const CLOSE_PROTOCOL = 4003; // a frame violated the ring protocol
export const CLOSE_ABORTED = 4004; // the ring was aborted locally, or a neighbour was lost (passed on)

export interface LinkOptions {
  highWaterMark?: number;
  /** Awaited before each frame goes out (upload pacing, a testing aid); frames keep their order. */
  throttle?: (bytes: number) => Promise<void>;
  /**
   * Testing aid: hand each incoming frame (and the close) to listeners this many ms after it
   * arrived, as a one-way link latency would (the kernel's netem is not always available).
   */
  latencyMs?: number;
}

export interface ConnectOptions extends LinkOptions {
  /** Largest incoming message; larger ones close the socket with 1009. */
  maxPayload?: number;
  handshakeTimeoutMs?: number;
  /** The identity key the server's certificate must carry (wss): anything else is refused before a byte is sent. */
  expectKey?: string;
}

/** A ring link's first frame, without its type tag (protocol/frames.ts `HelloSchema`). */
export type RingHello = Omit<HelloMessage, "t">;

/** The label of the keying material ring proofs are bound to. */
export const RING_BINDING = "ring";

/** Decides on a ring hello on its TLS session: null admits it (net/auth.ts, `Authorizer.admitRingPeer`). */
export type RingAdmission = (hello: RingHello, binding: Buffer | null) => { code: number; reason: string } | null;

/**
 * Run `fn` now, or `latencyMs` later (the --latency testing aid). Equal delays keep the
 * order of calls, as a link's one-way latency keeps the order of what it carries.
 */
export function afterLatency(latencyMs: number | undefined, fn: () => void): void {
  if (latencyMs && latencyMs > 0) setTimeout(fn, latencyMs);
  else fn();
}

/** A send on a link that is closed (or closing). */
export class LinkClosedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "LinkClosedError";
  }
}

/** WebSocket close reasons are limited to 123 bytes of UTF-8. */
function closeReason(reason: string): string {
  let r = reason;
  while (Buffer.byteLength(r) > 123) r = r.slice(0, -1);
  return r;
}

export class FrameLink {
  readonly highWaterMark: number;
  /** Whole frames handed to ws, in bytes. */
  bytesSent = 0;
  framesSent = 0;
  bytesReceived = 0;
  framesReceived = 0;
  /** The most bytes ever outstanding (handed to ws, callback not yet fired). */
  peakPendingBytes = 0;
  /** The last 'error' the socket reported, if any. */
  lastError: Error | null = null;

  private pending = 0;
  private drainWaiters: Array<{ resolve: () => void; reject: (err: Error) => void }> = [];
  private frameListener: ((bytes: Uint8Array) => void) | null = null;
  private queue: Uint8Array[] = [];
  private flushScheduled = false;
  private closeListeners: Array<(code: number, reason: string) => void> = [];
  private closeInfo: { code: number; reason: string } | null = null;
  private readonly throttle: ((bytes: number) => Promise<void>) | undefined;
  private readonly latencyMs: number | undefined;
  /** With a throttle: the previous frame's turn, so frames leave in call order. */
  private paced: Promise<void> = Promise.resolve();

  constructor(
    readonly ws: WebSocket,
    opts: LinkOptions = {},
  ) {
    this.highWaterMark = opts.highWaterMark ?? DEFAULT_HIGH_WATER_MARK;
    this.throttle = opts.throttle;
    this.latencyMs = opts.latencyMs;
    ws.binaryType = "nodebuffer";
    ws.on("error", (err: Error) => {
      this.lastError = err;
    });
    ws.on("message", (data: WebSocket.RawData, isBinary: boolean) => {
      if (!isBinary) {
        this.close(CLOSE_PROTOCOL, "text message on a binary ring link");
        return;
      }
      const bytes = Array.isArray(data)
        ? Buffer.concat(data)
        : data instanceof ArrayBuffer
          ? new Uint8Array(data)
          : (data as Buffer);
      this.bytesReceived += bytes.byteLength;
      this.framesReceived += 1;
      afterLatency(this.latencyMs, () => this.deliver(bytes));
    });
    ws.on("close", (code: number, reason: Buffer) => afterLatency(this.latencyMs, () => this.handleClose(code, reason.toString())));
    if (ws.readyState === WebSocket.CLOSED) this.handleClose(1006, "closed before use");
  }

  /** Bytes handed to ws whose send callback has not fired yet. */
  get pendingBytes(): number {
    return this.pending;
  }

  get closed(): boolean {
    return this.closeInfo !== null || this.ws.readyState !== WebSocket.OPEN;
  }

  /**
   * Hand one frame to the socket (frames go out in call order). Resolves at once while
   * the outstanding bytes are at or below the high-water mark, else when they drain
   * back to it. Rejects on a closed link. Callers that await every send keep at most
   * highWaterMark + one frame outstanding. `onWritten` is called once the socket no longer
   * needs `bytes` (written, or failed), so the caller may reuse the buffer.
   */
  send(bytes: Uint8Array, onWritten?: () => void): Promise<void> {
    if (this.closed) {
      onWritten?.();
      return Promise.reject(new LinkClosedError(this.describeClosed()));
    }
    const n = bytes.byteLength;
    this.pending += n;
    if (this.pending > this.peakPendingBytes) this.peakPendingBytes = this.pending;
    this.bytesSent += n;
    this.framesSent += 1;
    const done = (err?: Error | null) => {
      this.pending -= n;
      if (err && !this.lastError) this.lastError = err;
      onWritten?.();
      this.wakeDrainWaiters();
    };
    const throttle = this.throttle;
    if (throttle) {
      // Paced frames count as outstanding until sent, so backpressure holds their senders.
      this.paced = this.paced
        .then(() => throttle(n))
        .then(() => {
          if (this.ws.readyState === WebSocket.OPEN) this.ws.send(bytes, { binary: true }, done);
          else done(new LinkClosedError(this.describeClosed()));
        });
    } else this.ws.send(bytes, { binary: true }, done);
    if (this.pending <= this.highWaterMark) return Promise.resolve();
    return new Promise<void>((resolve, reject) => this.drainWaiters.push({ resolve, reject }));
  }

  /**
   * The one frame listener (a new one replaces the old). Frames that arrive while no
   * listener is set are queued and delivered, in order, once one is. Returns a function
   * that removes this listener.
   */
  onFrame(cb: (bytes: Uint8Array) => void): () => void {
    this.frameListener = cb;
    if (this.queue.length > 0) this.scheduleFlush();
    return () => {
      if (this.frameListener === cb) this.frameListener = null;
    };
  }

  /** Called once when the socket closes (at once, asynchronously, if already closed). */
  onClose(cb: (code: number, reason: string) => void): () => void {
    if (this.closeInfo) {
      const { code, reason } = this.closeInfo;
      queueMicrotask(() => cb(code, reason));
      return () => {};
    }
    this.closeListeners.push(cb);
    return () => {
      this.closeListeners = this.closeListeners.filter((l) => l !== cb);
    };
  }

  /** Start the closing handshake (idempotent). Pending and future sends reject. */
  close(code = 1000, reason = ""): void {
    if (this.ws.readyState === WebSocket.CONNECTING || this.ws.readyState === WebSocket.OPEN) {
      if (this.ws.isPaused) this.ws.resume(); // the handshake reads the peer's close frame
      this.ws.close(code, closeReason(reason));
    }
    this.rejectDrainWaiters(new LinkClosedError(`link closed locally (${code}${reason ? `: ${reason}` : ""})`));
  }

  /** Drop the connection at once, without a closing handshake. */
  terminate(): void {
    this.ws.terminate();
    this.rejectDrainWaiters(new LinkClosedError("link terminated locally"));
  }

  private describeClosed(): string {
    if (this.closeInfo) {
      const { code, reason } = this.closeInfo;
      return `link closed (code ${code}${reason ? `: ${reason}` : ""})`;
    }
    return "link is closing";
  }

  private deliver(bytes: Uint8Array): void {
    if (this.closeInfo) return;
    if (this.frameListener && this.queue.length === 0) {
      this.frameListener(bytes);
    } else {
      this.queue.push(bytes);
      if (this.frameListener) this.scheduleFlush();
    }
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    queueMicrotask(() => {
      this.flushScheduled = false;
      while (this.frameListener && this.queue.length > 0) {
        const bytes = this.queue.shift()!;
        this.frameListener(bytes);
      }
    });
  }

  private wakeDrainWaiters(): void {
    if (this.pending > this.highWaterMark || this.drainWaiters.length === 0) return;
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const w of waiters) w.resolve();
  }

  private rejectDrainWaiters(err: Error): void {
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const w of waiters) w.reject(err);
  }

  private handleClose(wsCode: number, reason: string): void {
    if (this.closeInfo) return;
    // When ws itself rejected an incoming frame (e.g. 1009, larger than maxPayload) it
    // sends that close code but stops reading, so its own 'close' often says 1006.
    const code = wsCode === 1006 ? (statusCodeOf(this.lastError) ?? wsCode) : wsCode;
    const why = reason || this.lastError?.message || "";
    this.closeInfo = { code, reason: why };
    this.queue = [];
    this.rejectDrainWaiters(new LinkClosedError(this.describeClosed()));
    const listeners = this.closeListeners;
    this.closeListeners = [];
    for (const l of listeners) l(code, why);
  }
}

/** The close code ws attaches to the errors its receiver raises (1002, 1007, 1009...). */
function statusCodeOf(err: Error | null): number | undefined {
  if (!err) return undefined;
  for (const sym of Object.getOwnPropertySymbols(err)) {
    if (sym.description === "status-code") {
      const v = (err as unknown as Record<symbol, unknown>)[sym];
      if (typeof v === "number") return v;
    }
  }
  return undefined;
}

/**
 * Open a client WebSocket (no compression, bounded message size) as a FrameLink. Over
 * wss, the server's certificate must carry `opts.expectKey` (checked once TLS is up,
 * before anything is sent: there is no certificate authority to ask).
 */
export function connectLink(url: string, opts: ConnectOptions = {}): Promise<FrameLink> {
  const ws = new WebSocket(url, {
    ...TLS_CLIENT_OPTIONS,
    perMessageDeflate: false,
    maxPayload: opts.maxPayload ?? MAX_FRAME_BYTES,
    handshakeTimeout: opts.handshakeTimeoutMs ?? 10_000,
    // All-zero masking key: RFC 6455 masking protects browser-facing intermediaries from
    // script-chosen bytes; between providers it only costs an XOR pass over every byte on
    // both ends (ws skips it for a zero key). Most of the ring's CPU time without this.
    generateMask: (mask: Buffer) => {
      mask.fill(0);
    },
  });
  // Errors after a failed connect must not become uncaught exceptions.
  ws.on("error", () => {});
  return new Promise<FrameLink>((resolve, reject) => {
    const onOpen = () => {
      cleanup();
      const problem = keyProblem(ws, opts.expectKey);
      if (problem) {
        ws.terminate();
        reject(new Error(`refused ${url}: ${problem}`));
      } else resolve(new FrameLink(ws, opts));
    };
    const onError = (err: Error) => {
      cleanup();
      ws.terminate();
      reject(new Error(`cannot connect to ${url}: ${err.message}`));
    };
    const onClose = (code: number) => {
      cleanup();
      reject(new Error(`cannot connect to ${url}: closed (${code}) before open`));
    };
    const cleanup = () => {
      ws.off("open", onOpen);
      ws.off("error", onError);
      ws.off("close", onClose);
    };
    ws.on("open", onOpen);
    ws.on("error", onError);
    ws.on("close", onClose);
  });
}

/** Why the server of `ws` is not the one expected (null: it is, or nothing was expected). */
export function keyProblem(ws: WebSocket, expectKey: string | undefined): string | null {
  if (expectKey === undefined) return null;
  const got = peerKey(ws);
  if (got === expectKey) return null;
  return got === null
    ? `no TLS certificate with an identity key (expected ${fingerprint(expectKey)})`
    : `its certificate's key ${fingerprint(got)} is not the expected ${fingerprint(expectKey)} (a different host, or someone in between)`;
}

/**
 * Open the ring connection to the next rank (`url` ends in `/ring`), check that its host
 * holds `opts.expectKey`, and say the hello `makeHello` proves on this TLS session.
 */
export async function connectRingPeer(
  url: string,
  makeHello: (binding: Buffer) => RingHello,
  opts: ConnectOptions = {},
): Promise<FrameLink> {
  const path = new URL(url).pathname;
  if (!path.endsWith("/ring")) throw new Error(`ring URL must end in /ring: ${url}`);
  const link = await connectLink(url, opts);
  try {
    const binding = sessionBinding(link.ws, RING_BINDING);
    if (!binding) throw new Error(`ring link to ${url} is not TLS 1.3: refusing to say hello on it`);
    await link.send(encodeControl({ t: "hello", ...makeHello(binding) }));
  } catch (err) {
    link.terminate();
    throw err;
  }
  return link;
}

/** A ring hello as it arrived, not yet admitted. */
export type ArrivedHello = RingHello;

/**
 * Read the first frame of an incoming ring connection, which must be a well-formed hello,
 * within timeoutMs; then stop reading (the socket pauses: nothing more is buffered until
 * `admitted` resumes it). On failure the socket is closed (4001 malformed first frame, 4002
 * timeout) and the promise rejects with ProtocolError. `ws` may be a FrameLink already
 * wrapping the socket (a bare ws drops messages that arrive while it has no listener).
 */
export function readRingHello(ws: WebSocket | FrameLink, timeoutMs: number, opts: LinkOptions = {}): Promise<{ hello: ArrivedHello; link: FrameLink }> {
  const link = ws instanceof FrameLink ? ws : new FrameLink(ws, opts);
  return new Promise((resolve, reject) => {
    let settled = false;
    const finish = () => {
      settled = true;
      clearTimeout(timer);
      offFrame();
      offClose();
    };
    const fail = (code: number, message: string) => {
      if (settled) return;
      finish();
      link.ws.resume(); // a close handshake reads the peer's close frame
      link.close(code, message);
      reject(new ProtocolError(message));
    };
    const timer = setTimeout(() => fail(CLOSE_BAD_RANK, `ring peer sent no hello within ${timeoutMs} ms`), timeoutMs);
    const offClose = link.onClose((code, reason) => {
      if (settled) return;
      finish();
      reject(new ProtocolError(`ring peer closed (${code}${reason ? `: ${reason}` : ""}) before hello`));
    });
    const offFrame = link.onFrame((bytes) => {
      if (settled) return;
      link.ws.pause();
      let frame;
      try {
        frame = decodeFrame(bytes);
      } catch (err) {
        fail(CLOSE_AUTH_FAILED, `bad ring hello: ${err instanceof Error ? err.message : String(err)}`);
        return;
      }
      if (frame.kind !== "control" || frame.msg.t !== "hello") {
        fail(CLOSE_AUTH_FAILED, "first frame on a ring connection must be hello");
        return;
      }
      finish();
      resolve({ hello: frame.msg, link });
    });
  });
}

/**
 * Decide on a hello read by `readRingHello`: admitted, the link reads again (frames after
 * the hello stay queued until someone calls link.onFrame); refused, it closes with the
 * code `admit` gives and this throws ProtocolError.
 */
export function admitRingHello(arrived: { hello: ArrivedHello; link: FrameLink }, admit: RingAdmission): { from: number; to: number; epoch: number; group?: string; link: FrameLink } {
  const { hello, link } = arrived;
  const refusal = admit(hello, sessionBinding(link.ws, RING_BINDING));
  link.ws.resume();
  if (refusal) {
    link.close(refusal.code, refusal.reason);
    throw new ProtocolError(refusal.reason);
  }
  return { from: hello.from, to: hello.to, epoch: hello.epoch, ...(hello.group ? { group: hello.group } : {}), link };
}

/** `readRingHello` then `admitRingHello`. */
export async function acceptRingPeer(
  ws: WebSocket | FrameLink,
  admit: RingAdmission,
  timeoutMs: number,
  opts: LinkOptions = {},
): Promise<{ from: number; to: number; epoch: number; group?: string; link: FrameLink }> {
  return admitRingHello(await readRingHello(ws, timeoutMs, opts), admit);
}
