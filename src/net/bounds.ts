import type { WebSocket } from "ws";

/**
 * The largest message `ws` accepts from now on: larger ones close it with 1009 before they
 * are buffered whole. Used to keep unauthenticated connections small (a hello) and raise
 * the limit once a peer is admitted. `ws` fixes maxPayload per server, so this sets the
 * connection's receiver limit (ws 8's Receiver reads `_maxPayload` for every frame; the
 * bounds tests fail if that ever stops holding).
 */
export function limitMessages(ws: WebSocket, maxBytes: number): void {
  const receiver = (ws as unknown as { _receiver?: { _maxPayload?: number } })._receiver;
  if (!receiver || typeof receiver._maxPayload !== "number") throw new Error("ws has no receiver limit to set (ws internals changed)");
  receiver._maxPayload = maxBytes;
}

/**
 * Caps on connections that have not authenticated yet: in all and per remote address.
 * `admit` returns a release function, or null when a cap is reached (close the
 * connection: 1013, try again later).
 */
export class ConnectionCaps {
  #total = 0;
  readonly #byAddress = new Map<string, number>();

  constructor(
    readonly maxTotal: number,
    readonly maxPerAddress: number,
  ) {}

  admit(address: string): (() => void) | null {
    const mine = this.#byAddress.get(address) ?? 0;
    if (this.#total >= this.maxTotal || mine >= this.maxPerAddress) return null;
    this.#total += 1;
    this.#byAddress.set(address, mine + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#total -= 1;
      const left = (this.#byAddress.get(address) ?? 1) - 1;
      if (left > 0) this.#byAddress.set(address, left);
      else this.#byAddress.delete(address);
    };
  }

  get open(): number {
    return this.#total;
  }
}

/**
 * At most one line per key (a peer and a kind of warning) every `intervalMs`; the next
 * line says how many were held back. Repeated bad hellos cannot flood a log.
 */
export class WarningLimiter {
  readonly #last = new Map<string, { at: number; held: number }>();

  constructor(private readonly intervalMs = 5_000) {}

  /** The line to write now, or null to hold it back. */
  pass(key: string, line: string, now = Date.now()): string | null {
    const seen = this.#last.get(key);
    if (seen && now - seen.at < this.intervalMs) {
      seen.held += 1;
      return null;
    }
    const held = seen?.held ?? 0;
    this.#last.set(key, { at: now, held: 0 });
    if (this.#last.size > 10_000) this.#last.clear(); // keys are per peer: bounded all the same
    return held > 0 ? `${line} (and ${held} more like it held back)` : line;
  }
}

/** Wrong tokens an address may send in `windowMs` before its hellos are refused unread for that long. */
export class WrongTokens {
  readonly #seen = new Map<string, number[]>();
  constructor(
    private readonly max = 5,
    private readonly windowMs = 10_000,
  ) {}

  note(address: string, now = Date.now()): void {
    const recent = (this.#seen.get(address) ?? []).filter((t) => now - t < this.windowMs);
    recent.push(now);
    this.#seen.set(address, recent);
    if (this.#seen.size > 10_000) this.#seen.clear();
  }

  blocked(address: string, now = Date.now()): boolean {
    return (this.#seen.get(address) ?? []).filter((t) => now - t < this.windowMs).length >= this.max;
  }
}
