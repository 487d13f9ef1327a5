import { EventEmitter } from "node:events";
import WebSocket from "ws";
import { UserError, errorMessage } from "../errors.js";
import { watchHeartbeat } from "../net/heartbeat.js";
import { unpack, type Incoming } from "./coordinator/answers.js";
import {
  decodeToCoordinator,
  encodeMessage,
  MAX_CONTROL_BYTES,
  PROTOCOL_VERSION,
  type ToCoordinator,
  type ToProvider,
} from "../protocol/messages.js";

export type Welcome = Extract<ToCoordinator, { t: "welcome" }>["provider"];

/** Accepts `host:port`, `ws://host:port` or `ws://host:port/control`; returns the control URL. */
export function controlUrl(address: string): string {
  const withScheme = /^wss?:\/\//.test(address) ? address : `ws://${address}`;
  const url = new URL(withScheme);
  if (!url.port) throw new UserError(`Provider address ${address} has no port`, "Write it as host:port, e.g. 10.0.0.7:7070.");
  url.pathname = "/control";
  return url.toString();
}

/** The same provider's data-plane URL. */
export function ringUrl(address: string): string {
  const url = new URL(controlUrl(address));
  url.pathname = "/ring";
  return url.toString();
}

/** The coordinator's connection to one provider's control plane. */
export class ProviderClient extends EventEmitter<{ message: [Incoming]; lost: [string] }> {
  private closedByUs = false;

  private constructor(
    readonly address: string,
    private readonly ws: WebSocket,
    readonly info: Welcome,
  ) {
    super();
    ws.on("message", (data, isBinary) => {
      let message: Incoming;
      try {
        message = unpack(decodeToCoordinator(isBinary ? data : String(data), `provider ${address}`), `provider ${address}`);
      } catch (err) {
        this.emit("lost", errorMessage(err));
        ws.terminate();
        return;
      }
      this.emit("message", message);
    });
    ws.on("close", (code, reason) => {
      if (this.closedByUs) return;
      if (this.silentFor !== null) this.emit("lost", `no heartbeat for ${(this.silentFor / 1000).toFixed(1)} s (hung, stopped or cut off)`);
      else this.emit("lost", `closed the connection (${code}${reason.length ? ` ${reason}` : ""})`);
    });
  }

  /** Connect, authenticate with the token, and wait for the provider's welcome. */
  static async connect(address: string, token: string, timeoutMs = 15_000): Promise<ProviderClient> {
    const url = controlUrl(address);
    const ws = new WebSocket(url, { maxPayload: MAX_CONTROL_BYTES, handshakeTimeout: timeoutMs });
    ws.binaryType = "nodebuffer";
    const welcome = await new Promise<Welcome>((resolve, reject) => {
      const timer = setTimeout(() => {
        ws.terminate();
        reject(new UserError(`Provider ${address} did not answer within ${timeoutMs / 1000} s`, "Check that `nimble provide` is running there and the port is reachable."));
      }, timeoutMs);
      const done = (err: Error | null, value?: Welcome) => {
        clearTimeout(timer);
        ws.removeAllListeners("message");
        ws.removeAllListeners("error");
        ws.removeAllListeners("close");
        if (err) reject(err);
        else resolve(value!);
      };
      ws.on("open", () => ws.send(encodeMessage({ t: "hello", token, version: PROTOCOL_VERSION })));
      ws.on("error", (err) =>
        done(new UserError(`Cannot reach provider ${address}: ${errorMessage(err)}`, "Is `nimble provide` running there? Check the address, port and any firewall between you.")),
      );
      ws.on("close", (code) => done(new UserError(`Provider ${address} closed the connection during the handshake (code ${code})`)));
      ws.on("message", (data, isBinary) => {
        try {
          const m = unpack(decodeToCoordinator(isBinary ? data : String(data), `provider ${address}`), `provider ${address}`);
          if (m.t === "welcome") {
            if (m.version !== PROTOCOL_VERSION) {
              ws.close();
              done(new UserError(`Provider ${address} speaks protocol ${m.version}, this nimble speaks ${PROTOCOL_VERSION}`, "Run the same nimble version on both sides."));
            } else done(null, m.provider);
          } else if (m.t === "reject") {
            done(
              new UserError(
                `Provider ${address} refused the job: ${m.reason}`,
                m.reason === "wrong token" ? "Use the token `nimble provide` printed when it started (config `token` or NIMBLE_TOKEN)." : undefined,
              ),
            );
          } else done(new UserError(`Provider ${address} sent ${m.t} before its welcome`));
        } catch (err) {
          ws.terminate();
          done(new UserError(errorMessage(err)));
        }
      });
    });
    return new ProviderClient(address, ws, welcome);
  }

  /** Declare the provider lost (event `lost`) when it is silent for `timeoutMs` (hung, stopped, cut off). */
  watchHeartbeat(timeoutMs: number): void {
    watchHeartbeat(this.ws, {
      timeoutMs,
      onDead: (silent) => {
        this.silentFor = silent;
      },
    });
  }

  /** Set when the heartbeat gave up on the provider: how long it had been silent. */
  private silentFor: number | null = null;

  send(message: ToProvider): void {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(encodeMessage(message));
  }

  close(): void {
    this.closedByUs = true;
    this.ws.close(1000, "job over");
  }
}
