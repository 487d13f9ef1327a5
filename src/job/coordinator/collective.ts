import { chooseAllReduce, type LinkCosts, predictAllReduceS } from "../../collective/costModel.js";
import type { JobConfig } from "../../config/schema.js";
import type { CollectiveChoice, CollectiveTiming } from "../../protocol/messages.js";

/**
 * Ring or direct, for each all-reduce on the job's links: the coordinator's choice from the
 * alpha-beta cost model (src/collective/costModel.ts) fed by the links measured in the job
 * (probe_links: round trips and a bulk upload to each member's ring successor), refined from
 * the all-reduces it then sees run.
 *
 * Both algorithms send 2(N-1)/N of the buffer per member; the ring pays 2(N-1) hops of
 * latency, the direct all-reduce 2 hops but N-1 messages per phase through each uplink. So
 * the direct one wins below some size and the ring (its chunks pipelined) may win above:
 * providers are told that size (`direct_max_bytes` in each round's orders) and choose per
 * all-reduce, so that a step's small all-reduces (PowerSGD's factors, DiLoCo's fragments)
 * and its large ones each go the cheaper way.
 */

/** Per-message software cost on a provider (framing, a syscall, scheduling), measured on loopback with TLS links. */
export const DEFAULT_HOP_S = 100e-6;
/** Links between ranks of one host (the probe reports none): loopback figures. */
export const LOOPBACK_RTT_MS = 0.1;
export const LOOPBACK_RATE_BYTES_PER_S = 1e9;
/** All-reduces seen, kept for refining the model (the most recent). */
const OBSERVATIONS_KEPT = 64;
/** Fewer observations than this: the measured link alone. */
const MIN_OBSERVATIONS = 3;

export type Algorithm = "ring" | "direct";

export interface CollectiveSummary {
  /** As configured (auto, ring or direct). */
  config: JobConfig["collective"]["algorithm"];
  /** The choice for the gradient all-reduce (`bytes` among `members`), at the end of the run. */
  algorithm: Algorithm;
  members: number;
  bytes: number;
  predicted_s: Record<Algorithm, number>;
  /** The direct all-reduce is chosen for all-reduces of at most this many bytes (null: any; 0 bytes at most: none). */
  direct_max_bytes: number | null;
  /** The links measured (bottleneck: the longest round trip, the slowest upload), and the model's figures from them. */
  link: { rtt_ms: number; rate_bytes_per_s: number; source: "measured" | "loopback"; alpha_s: number; beta_s_per_byte: number; hop_s: number };
  /** alpha_s as refined from the all-reduces observed (null: not enough of them yet). */
  refined_alpha_s: number | null;
  /** All-reduces run on the job's links, by algorithm: how many, and their mean seconds (the least-waiting member's). */
  observed: Record<Algorithm, { count: number; mean_s: number | null }>;
}

/** The bytes a step's gradient all-reduce carries, before any is seen: the parameters in the config's codec. */
export function estimateGradientBytes(config: JobConfig, paramBytes: number): number {
  const ratio = (codec: string): number => (codec === "fp16" || codec === "bf16" ? 0.5 : codec === "int8" ? (1 + 4 / 256) / 4 : codec === "int4" ? (0.5 + 4 / 64) / 4 : 1);
  if (config.strategy.name === "diloco") return Math.round((paramBytes * ratio(config.strategy.codec)) / config.strategy.fragments);
  return Math.round(paramBytes * ratio(config.compression.method));
}

/**
 * `auto` links every pair only up to this many members: N(N-1) links per job, and beyond it
 * the direct all-reduce's N-1 messages per phase through each uplink rarely pay.
 */
export const AUTO_MAX_MEMBERS = 32;

/** Which members link to every other (the job spec's `collective`): none with `ring` or a pipeline. */
export function directMinMembers(config: JobConfig): number | null {
  if (config.parallel || config.collective.algorithm === "ring") return null;
  // With two members the direct all-reduce is the ring's own schedule: auto links pairs from three.
  return config.collective.algorithm === "direct" ? 2 : 3;
}

/** The job spec's `collective` (undefined: the ring only). */
export function directLinksSpec(config: JobConfig): { direct_min_members: number; direct_max_members?: number } | undefined {
  const min = directMinMembers(config);
  if (min === null) return undefined;
  return config.collective.algorithm === "auto" ? { direct_min_members: min, direct_max_members: AUTO_MAX_MEMBERS } : { direct_min_members: min };
}

/** Observations of each algorithm at one size before what was measured decides between them. */
const MIN_SEEN = 3;

/** Seconds of `algorithm` on `n` members, solving for the alpha that predicts `seconds` (bisection: predictions grow with alpha). */
function alphaFor(algorithm: Algorithm, n: number, bytes: number, seconds: number, link: LinkCosts): number {
  const at = (alphaS: number) => predictAllReduceS(algorithm, n, bytes, { ...link, alphaS });
  if (at(0) >= seconds) return 0;
  let lo = 0;
  let hi = 1;
  while (at(hi) < seconds && hi < 1e3) hi *= 2;
  for (let i = 0; i < 50; i++) {
    const mid = (lo + hi) / 2;
    if (at(mid) < seconds) lo = mid;
    else hi = mid;
  }
  return (lo + hi) / 2;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export class CollectivePlanner {
  readonly config: JobConfig["collective"]["algorithm"];
  /** The job's all-reduces are the job's ring's (not a pipeline's stage rings): they are timed and summarised. */
  readonly tracked: boolean;
  /** The direct all-reduce may run (not `ring`, not a pipeline): see `directMinMembers`. */
  readonly enabled: boolean;
  #link: { rttMs: number; rate: number; source: "measured" | "loopback" } = { rttMs: LOOPBACK_RTT_MS, rate: LOOPBACK_RATE_BYTES_PER_S, source: "loopback" };
  readonly #hopS: number;
  #observations: { algorithm: Algorithm; members: number; bytes: number; seconds: number }[] = [];
  readonly #counts: Record<Algorithm, { count: number; seconds: number }> = { ring: { count: 0, seconds: 0 }, direct: { count: 0, seconds: 0 } };
  #refinedAlpha: number | null = null;
  /** The gradient all-reduce's bytes: estimated, then the largest all-reduce of the last round. */
  gradientBytes = 0;
  #minMembers: number | null;
  readonly #maxMembers: number;

  constructor(config: JobConfig, opts: { hopS?: number } = {}) {
    this.config = config.collective.algorithm;
    this.#minMembers = directMinMembers(config);
    this.#maxMembers = config.collective.algorithm === "auto" ? AUTO_MAX_MEMBERS : Infinity;
    this.enabled = this.#minMembers !== null;
    this.tracked = !config.parallel;
    this.#hopS = opts.hopS ?? DEFAULT_HOP_S;
  }

  /** Whether the choice needs measured links for `members` (auto, with the direct all-reduce possible). */
  wantsLinks(members: number): boolean {
    return this.enabled && this.config === "auto" && this.#minMembers !== null && members >= this.#minMembers && members <= this.#maxMembers;
  }

  /** The links the probe measured: the model takes the bottleneck (longest round trip, slowest upload). */
  setLinks(links: readonly { rtt_ms: number | null; upload_bytes_per_s: number | null }[]): void {
    const rtts = links.map((l) => l.rtt_ms).filter((x): x is number => x !== null);
    const rates = links.map((l) => l.upload_bytes_per_s).filter((x): x is number => x !== null);
    if (rtts.length === 0 || rates.length === 0) return;
    this.#link = { rttMs: Math.max(...rtts), rate: Math.min(...rates), source: "measured" };
  }

  /** The model's link: the measured one, its latency refined once enough all-reduces were seen. */
  get costs(): LinkCosts {
    return { alphaS: this.#refinedAlpha ?? this.#link.rttMs / 2000, betaSPerByte: 1 / this.#link.rate, hopS: this.#hopS };
  }

  /** The algorithms `members` may use now. */
  #available(members: number): Algorithm[] {
    if (!this.enabled || members < (this.#minMembers ?? Infinity) || members > this.#maxMembers) return ["ring"];
    if (this.config === "direct") return ["direct"];
    if (this.config === "ring") return ["ring"];
    return ["ring", "direct"];
  }

  /** The choice for an all-reduce of `bytes` among `members`, with both predictions. */
  choose(members: number, bytes: number): { algorithm: Algorithm; predictedS: Record<Algorithm, number> } {
    const link = this.costs;
    const predictedS = { ring: predictAllReduceS("ring", members, bytes, link), direct: predictAllReduceS("direct", members, bytes, link) };
    const { algorithm } = chooseAllReduce(members, bytes, link, this.#available(members));
    const faster = this.#available(members).length > 1 ? this.#observedFaster(members, bytes) : null;
    return { algorithm: faster ?? (algorithm as Algorithm), predictedS };
  }

  /**
   * Which of ring and direct ran all-reduces of `bytes` among `members` faster, once each was
   * seen MIN_SEEN times (null: not known). What was measured overrules the model, whose rate
   * comes from a short probe that can underrate a link.
   */
  #observedFaster(members: number, bytes: number): Algorithm | null {
    const seen = (a: Algorithm) => {
      const xs = this.#observations.filter((o) => o.algorithm === a && o.members === members && o.bytes === bytes).map((o) => o.seconds);
      return xs.length >= MIN_SEEN ? median(xs) : null;
    };
    const ring = seen("ring");
    const direct = seen("direct");
    if (ring === null || direct === null) return null;
    return direct < ring ? "direct" : "ring";
  }

  /**
   * The largest all-reduce (bytes) that should go direct among `members`: null for any, 0 for
   * none but empty ones. The predictions are compared on sizes from 1 KiB to 4 GiB, doubling,
   * and the first size where the ring is no slower is narrowed down by bisection.
   */
  directMaxBytes(members: number): number | null {
    const max = this.#modelDirectMaxBytes(members);
    const g = this.gradientBytes;
    if (this.#available(members).length < 2 || g <= 0) return max;
    // The gradient all-reduce goes the way that was measured faster, whatever the model says.
    const faster = this.#observedFaster(members, g);
    if (faster === "direct" && max !== null && max < g) return g;
    if (faster === "ring" && (max === null || max >= g)) return g - 1;
    return max;
  }

  #modelDirectMaxBytes(members: number): number | null {
    const available = this.#available(members);
    if (!available.includes("direct")) return 0;
    if (available.length === 1) return null;
    const link = this.costs;
    const ringWins = (b: number) => chooseAllReduce(members, b, link, ["ring", "direct"]).algorithm === "ring";
    let lo = 0;
    if (ringWins(1)) return 0;
    for (let b = 1024; b <= 2 ** 32; b *= 2) {
      if (ringWins(b)) {
        let hi = b;
        while (hi - lo > Math.max(1, lo / 1000)) {
          const mid = Math.floor((lo + hi) / 2);
          if (ringWins(mid)) hi = mid;
          else lo = mid;
        }
        return lo;
      }
      lo = b;
    }
    return null;
  }

  /** What a round's orders carry (undefined: the ring for all). */
  orderField(members: number): CollectiveChoice | undefined {
    const max = this.directMaxBytes(members);
    return max === 0 ? undefined : { direct_max_bytes: max };
  }

  /**
   * A round's reports: each member's all-reduces on the job's links, in order. The k-th
   * all-reduce of every member is one collective; its time is the least any member saw (the
   * last to join waits for no one).
   */
  observe(reports: Iterable<{ collectives?: CollectiveTiming[] }>, members: number): void {
    const lists = [...reports].map((r) => r.collectives ?? []);
    if (lists.length === 0) return;
    const k = Math.min(...lists.map((l) => l.length));
    let largest = 0;
    for (let i = 0; i < k; i++) {
      const at = lists.map((l) => l[i]);
      const algorithm = at[0].algorithm;
      if (at.some((t) => t.algorithm !== algorithm || t.bytes !== at[0].bytes)) continue;
      const seconds = Math.min(...at.map((t) => t.seconds));
      this.#counts[algorithm].count += 1;
      this.#counts[algorithm].seconds += seconds;
      largest = Math.max(largest, at[0].bytes);
      if (members > 1) this.#observations.push({ algorithm, members, bytes: at[0].bytes, seconds });
    }
    if (largest > 0) this.gradientBytes = largest;
    if (this.#observations.length > OBSERVATIONS_KEPT) this.#observations.splice(0, this.#observations.length - OBSERVATIONS_KEPT);
    this.#refine();
  }

  /** The latency that best explains what was observed (the median of each observation's), the rate kept as measured. */
  #refine(): void {
    if (this.#observations.length < MIN_OBSERVATIONS) return;
    const base = { alphaS: 0, betaSPerByte: 1 / this.#link.rate, hopS: this.#hopS };
    this.#refinedAlpha = median(this.#observations.map((o) => alphaFor(o.algorithm, o.members, o.bytes, o.seconds, base)));
  }

  /** The start-up line: what was chosen for the gradient all-reduce, and why. */
  describe(members: number): string {
    const bytes = this.gradientBytes;
    const { algorithm, predictedS } = this.choose(members, bytes);
    const ms = (s: number) => `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`;
    const max = this.directMaxBytes(members);
    const why =
      this.config !== "auto" ? " (as configured)" : this.#available(members).length > 1 ? "" : members > this.#maxMembers ? ` (more than ${this.#maxMembers} members: ring)` : ` (fewer than ${this.#minMembers} members: ring)`;
    const rule =
      this.config !== "auto" || this.#available(members).length === 1 ? "" : max === null ? "; direct at every size" : max === 0 ? "; ring at every size" : `; direct for all-reduces up to ${formatBytes(max)}`;
    const l = this.#link;
    return (
      `Collective: ${algorithm}${why} for the gradient all-reduce of ${formatBytes(bytes)} among ${members}: predicted ring ${ms(predictedS.ring)}, direct ${ms(predictedS.direct)} ` +
      `(${l.source === "measured" ? "measured" : "loopback"} link: rtt ${l.rttMs.toFixed(1)} ms, ${formatBytes(l.rate)}/s)${rule}`
    );
  }

  summary(members: number): CollectiveSummary {
    const { algorithm, predictedS } = this.choose(members, this.gradientBytes);
    const c = this.costs;
    const mean = (a: Algorithm) => ({ count: this.#counts[a].count, mean_s: this.#counts[a].count ? this.#counts[a].seconds / this.#counts[a].count : null });
    return {
      config: this.config,
      algorithm,
      members,
      bytes: this.gradientBytes,
      predicted_s: predictedS,
      direct_max_bytes: this.directMaxBytes(members),
      link: { rtt_ms: this.#link.rttMs, rate_bytes_per_s: this.#link.rate, source: this.#link.source, alpha_s: this.#link.rttMs / 2000, beta_s_per_byte: c.betaSPerByte, hop_s: this.#hopS },
      refined_alpha_s: this.#refinedAlpha,
      observed: { ring: mean("ring"), direct: mean("direct") },
    };
  }
}

function formatBytes(b: number): string {
  if (b >= 1e9) return `${(b / 1e9).toFixed(2)} GB`;
  if (b >= 1e6) return `${(b / 1e6).toFixed(1)} MB`;
  if (b >= 1e3) return `${(b / 1e3).toFixed(1)} kB`;
  return `${Math.round(b)} B`;
}
