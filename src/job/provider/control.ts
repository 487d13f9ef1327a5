import type { IncomingMessage } from "node:http";
import type { WebSocket } from "ws";
import { errorMessage } from "../../errors.js";
import { limitMessages } from "../../net/bounds.js";
import { afterLatency } from "../../net/link.js";
import { decodeToProvider, encodeMessage, MAX_CONTROL_BYTES, type ToCoordinator, type ToProvider } from "../../protocol/messages.js";
import { cleanText } from "../../protocol/text.js";
import type { Admitted, Refusal } from "../../net/auth.js";
import type { LinkBytes } from "./types.js";

/** The largest message a coordinator may send before it is admitted: a hello is tiny. */
export const MAX_HELLO_BYTES = 64 * 1024;
/** A coordinator that sends no hello this long is dropped (4003). */
const HELLO_TIMEOUT_MS = 10_000;

/**
 * One coordinator connection on /control, as one explicit state: `hello` (nothing read but
 * one small message), `welcoming` (authenticated; waiting to hear whether a job runs),
 * `admitted` (its messages reach the provider), `closed` (nothing more is read).
 */
export type ControlState = "hello" | "welcoming" | "admitted" | "closed";

export interface ControlHost {
  /** Decide on a hello on this connection's TLS session: who the coordinator is, or why not. */
  admit(hello: Extract<ToProvider, { t: "hello" }>, conn: ControlConnection): { admitted: Admitted } | { refusal: Refusal };
  /** Authenticated: welcome it (true) or turn it away as busy (false). */
  welcome(conn: ControlConnection): Promise<boolean>;
  /** An admitted coordinator's message. */
  message(conn: ControlConnection, message: ToProvider): void;
  closed(conn: ControlConnection): void;
  log(line: string, level: "debug" | "info" | "warn"): void;
}

export class ControlConnection {
  #state: ControlState = "hello";
  /** Messages that arrive while the welcome is decided, handled once it is. */
  #held: ToProvider[] = [];
  readonly bytes: LinkBytes = { sent: 0, received: 0 };
  readonly from: string;
  readonly address: string;
  readonly #helloTimer: NodeJS.Timeout;
  /** Once admitted: the coordinator's key (verified) and the nonce of its hello. */
  coordinator: (Admitted & { nonce: Uint8Array }) | null = null;

  constructor(
    readonly ws: WebSocket,
    req: IncomingMessage,
    private readonly host: ControlHost,
    private readonly latencyMs: number | undefined,
    /** Released when the connection is admitted or closed (the unauthenticated caps). */
    private readonly release: () => void,
  ) {
    this.address = req.socket.remoteAddress ?? "unknown";
    this.from = `coordinator ${this.address}:${req.socket.remotePort}`;
    limitMessages(ws, MAX_HELLO_BYTES);
    this.#helloTimer = setTimeout(() => this.close(4003, "no hello"), HELLO_TIMEOUT_MS);
    host.log(`${this.from} connected`, "debug");
    ws.on("message", (data, isBinary) => afterLatency(latencyMs, () => this.#receive(data, isBinary)));
    ws.on("close", () =>
      afterLatency(latencyMs, () => {
        this.#enter("closed");
        host.log(`${this.from} disconnected`, "debug");
        host.closed(this);
      }),
    );
    ws.on("error", () => {});
  }

  get state(): ControlState {
    return this.#state;
  }

  send(m: ToCoordinator): void {
    const encoded = encodeMessage(m);
    afterLatency(this.latencyMs, () => {
      if (this.ws.readyState !== this.ws.OPEN) return;
      this.bytes.sent += encoded.byteLength;
      this.ws.send(encoded);
    });
  }

  close(code: number, reason: string): void {
    this.#enter("closed");
    this.ws.close(code, reason);
  }

  #enter(state: ControlState) {
    if (this.#state === "closed") return;
    this.#state = state;
    if (state !== "hello") {
      clearTimeout(this.#helloTimer);
      this.release();
    }
    if (state === "admitted") limitMessages(this.ws, MAX_CONTROL_BYTES);
  }

  #receive(data: Buffer | ArrayBuffer | Buffer[], isBinary: boolean) {
    if (this.#state === "closed") return; // nothing after a close is decoded
    this.bytes.received += Array.isArray(data) ? data.reduce((n, b) => n + b.byteLength, 0) : data.byteLength;
    let message: ToProvider;
    try {
      message = decodeToProvider(isBinary ? data : String(data), this.from);
    } catch (err) {
      this.host.log(`dropping ${this.from}: ${cleanText(errorMessage(err), 1000)}`, "warn");
      return this.close(4000, "invalid message");
    }
    if (this.#state === "hello") return void this.#hello(message);
    if (this.#state === "welcoming") return void this.#held.push(message);
    if (message.t !== "hello") this.host.message(this, message);
  }

  async #hello(message: ToProvider) {
    if (message.t !== "hello") return this.close(4000, "expected hello");
    const decision = this.host.admit(message, this);
    if ("refusal" in decision) {
      const { refusal } = decision;
      this.host.log(`rejected ${this.from}: ${refusal.reason}`, "warn");
      this.send({ t: "reject", reason: refusal.reason });
      return this.close(refusal.code, refusal.reason.slice(0, 100));
    }
    this.coordinator = { ...decision.admitted, nonce: message.nonce! };
    this.host.log(`${this.from} authenticated as ${decision.admitted.fingerprint} (${decision.admitted.mode === "key" ? "an allowed key" : "the token"})`, "debug");
    this.#enter("welcoming");
    if (!(await this.host.welcome(this))) return this.close(4009, "busy");
    this.#enter("admitted");
    const held = this.#held;
    this.#held = [];
    for (const m of held) if (this.#state === "admitted" && m.t !== "hello") this.host.message(this, m);
  }
}
