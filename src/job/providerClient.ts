import { EventEmitter } from "node:events";
import WebSocket from "ws";
import { UserError, errorMessage } from "../errors.js";
import { CONTROL_BINDING, PURPOSE } from "../net/auth.js";
import { watchHeartbeat } from "../net/heartbeat.js";
import { fingerprint, type Identity } from "../identity/identity.js";
import { keyProblem } from "../net/link.js";
import { checkProof, prove } from "../identity/proof.js";
import { peerKey, sessionBinding, TLS_CLIENT_OPTIONS } from "../net/tls.js";
import { ReportParts, unpack, type Incoming } from "./coordinator/answers.js";
import {
  decodeToCoordinator,
  encodeMessage,
  MAX_CONTROL_BYTES,
  PROTOCOL_VERSION,
  type ToCoordinator,
  type ToProvider,
} from "../protocol/messages.js";

export type Welcome = Extract<ToCoordinator, { t: "welcome" }>["provider"];

/** How the coordinator authenticates to a provider, and the provider to it. */
export interface ProviderCredentials {
  identity: Identity;
  /** Token mode: both sides prove they know it. */
  token?: string;
  /** Key mode: the provider's certificate must carry this key. */
  key?: string;
}

/** Accepts `host:port`, `wss://host:port` or `wss://host:port/control`; returns the control URL. */
export function controlUrl(address: string): string {
  if (/^ws:\/\//.test(address)) {
    throw new UserError(`Provider address ${address} asks for a plain ws:// link`, "Links are TLS: write host:port or wss://host:port.");
  }
  const withScheme = /^wss:\/\//.test(address) ? address : `wss://${address}`;
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
    /** The provider's identity key: its certificate's, and what signed its welcome. */
    readonly key: string,
  ) {
    super();
    const parts = new ReportParts();
    ws.on("message", (data, isBinary) => {
      let message: Incoming;
      try {
        const whole = parts.take(decodeToCoordinator(isBinary ? data : String(data), `provider ${address}`), `provider ${address}`);
        if (!whole) return; // a report's parts are still coming
        message = unpack(whole, `provider ${address}`);
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

  /**
   * Connect over TLS, prove who we are on this session (and, in token mode, that we know
   * the token), and check the provider's welcome: its certificate's key (the one named in
   * key mode), and its own proof over our nonce.
   */
  static async connect(address: string, creds: ProviderCredentials, timeoutMs = 15_000): Promise<ProviderClient> {
    const url = controlUrl(address);
    const ws = new WebSocket(url, { ...TLS_CLIENT_OPTIONS, maxPayload: MAX_CONTROL_BYTES, handshakeTimeout: timeoutMs });
    ws.binaryType = "nodebuffer";
    let binding: Buffer | null = null;
    let nonce: Uint8Array | null = null;
    let key = "";
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
      ws.on("open", () => {
        const problem = keyProblem(ws, creds.key);
        binding = sessionBinding(ws, CONTROL_BINDING);
        if (problem || !binding) {
          ws.terminate();
          return done(new UserError(`Refused provider ${address}: ${problem ?? "it does not speak TLS 1.3"}`, problem ? "Check the provider's key in the config (`nimble id` on that host prints it)." : undefined));
        }
        key = peerKey(ws)!;
        const proof = prove(creds.identity, PURPOSE.coordinator, binding, { token: creds.token });
        nonce = proof.nonce;
        ws.send(encodeMessage({ t: "hello", version: PROTOCOL_VERSION, ...proof }));
      });
      ws.on("error", (err) =>
        done(new UserError(`Cannot reach provider ${address}: ${errorMessage(err)}`, "Is `nimble provide` running there? Check the address, port and any firewall between you.")),
      );
      ws.on("close", (code) => done(new UserError(`Provider ${address} closed the connection during the handshake (code ${code})`)));
      ws.on("message", (data, isBinary) => {
        try {
          const raw = decodeToCoordinator(isBinary ? data : String(data), `provider ${address}`);
          if (raw.t === "report_part") throw new UserError(`Provider ${address} sent ${raw.t} before its welcome`);
          const m = unpack(raw, `provider ${address}`);
          if (m.t === "welcome") {
            if (m.version !== PROTOCOL_VERSION) {
              ws.close();
              done(new UserError(`Provider ${address} speaks protocol ${m.version}, this nimble speaks ${PROTOCOL_VERSION}`, "Run the same nimble version on both sides."));
            } else {
              const { signed, tokenOk } = checkProof(m, PURPOSE.provider, binding!, { token: creds.token, nonces: [nonce!] });
              const problem = !signed || m.key !== key ? "its welcome is not signed by its certificate's key" : !creds.key && !tokenOk ? "it does not know the token (someone in between, or another host)" : null;
              if (problem) {
                ws.terminate();
                done(new UserError(`Refused provider ${address} (${fingerprint(key)}): ${problem}`));
              } else done(null, m.provider);
            }
          } else if (m.t === "reject") {
            done(
              new UserError(
                `Provider ${address} refused the job: ${m.reason}`,
                m.reason === "wrong token"
                  ? "Use the token `nimble provide` printed when it started (config `token` or NIMBLE_TOKEN)."
                  : m.reason === "key not allowed"
                    ? `Ask its owner to --allow your key ${creds.identity.key} (\`nimble id\` prints it).`
                    : undefined,
              ),
            );
          } else done(new UserError(`Provider ${address} sent ${m.t} before its welcome`));
        } catch (err) {
          ws.terminate();
          done(new UserError(errorMessage(err)));
        }
      });
    });
    return new ProviderClient(address, ws, welcome, key);
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

  /** Resolves once what was sent has mostly left (under 4 MiB buffered): backpressure for bulk sends. */
  async drained(): Promise<void> {
    while (this.ws.readyState === WebSocket.OPEN && this.ws.bufferedAmount > 4 * 1024 * 1024) await new Promise((r) => setTimeout(r, 10));
  }

  close(): void {
    this.closedByUs = true;
    this.ws.close(1000, "job over");
  }
}
