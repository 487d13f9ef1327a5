/**
 * Upload pacing for a host: the bytes of every link share one budget, as they share one
 * uplink. A testing and benchmarking aid (`nimble provide --link-rate`), so that slow
 * internet links can be reproduced over loopback.
 */
export class RateLimit {
  /** When (ms, performance.now clock) the bytes handed out so far will have left. */
  private free = 0;

  constructor(
    readonly bytesPerS: number,
    /** Bytes that may go at once before pacing starts, so small frames are not delayed. */
    readonly burstBytes = Math.max(16 * 1024, bytesPerS / 100),
  ) {
    if (!(Number.isFinite(bytesPerS) && bytesPerS > 0)) throw new RangeError(`link rate must be a positive number of bytes/s, got ${bytesPerS}`);
  }

  /** Resolves when `bytes` may be sent without exceeding the rate. */
  take(bytes: number): Promise<void> {
    const now = performance.now();
    const start = Math.max(now - (this.burstBytes / this.bytesPerS) * 1000, this.free);
    this.free = start + (bytes / this.bytesPerS) * 1000;
    // Idle time earns credit up to the burst; a call waits until all bytes so far are paid for.
    const wait = this.free - now;
    return wait > 1 ? new Promise((resolve) => setTimeout(resolve, wait)) : Promise.resolve();
  }
}

/** Parse `--link-rate`: bytes/s with an optional unit (`100Mbit`, `12.5MB`, `500kB`, `1e6`). */
export function parseRate(text: string): number {
  const m = /^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(|b|kb|mb|gb|kbit|mbit|gbit)(?:\/s)?\s*$/i.exec(text);
  if (!m) throw new RangeError(`cannot read "${text}" as a rate: use bytes/s, or a unit like 100Mbit, 12.5MB, 500kB`);
  const value = Number(m[1]);
  const unit = m[2].toLowerCase();
  const factor: Record<string, number> = { "": 1, b: 1, kb: 1e3, mb: 1e6, gb: 1e9, kbit: 125, mbit: 125e3, gbit: 125e6 };
  const rate = value * factor[unit];
  if (!(rate > 0)) throw new RangeError(`a link rate must be positive, got "${text}"`);
  return rate;
}
