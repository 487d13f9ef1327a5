import type { LinkOptions } from "../../../net/link.js";
import { RateLimit } from "../../../net/rateLimit.js";

/**
 * Testing and benchmarking aids for internet-like links over loopback: `--link-rate` paces
 * everything this host uploads (ring frames, link measurements) to that many bytes/s, and
 * `--latency` hands each frame on that many ms after it arrives.
 */
export function linkPacing(linkRate: number | undefined, latencyMs: number | undefined): LinkOptions {
  const uplink = linkRate ? new RateLimit(linkRate) : null;
  return { throttle: uplink ? (bytes) => uplink.take(bytes) : undefined, latencyMs };
}
