import type { FrameLink } from "../../net/link.js";
import { STATS_INTERVAL_MS, type LinkBytes, type RankStats, type StatsEvent } from "./types.js";

/**
 * What the provider's owner sees of a job: each local rank's steps, samples and timings,
 * and the bytes on the job's ring and control links. It observes the reports its relay
 * passes on; it does not change them.
 */
export class JobStats {
  readonly #ranks: Map<number, RankStats & { unsettled: { step: number; samples: number } | null }>;
  readonly #startedAt = Date.now();
  /** Ring links of this job that are open; closed ones are folded into `#closedRing`. */
  readonly #ringLinks = new Set<FrameLink>();
  readonly #closedRing: LinkBytes = { sent: 0, received: 0 };
  /** The job's last step a local rank reported, and how many steps local ranks took part in. */
  #lastStep = -1;
  #stepsTakenPart = 0;
  #last = "";
  readonly #timer: NodeJS.Timeout;

  constructor(
    private readonly job: { job: string; name: string },
    ranks: readonly { rank: number; device: string }[],
    private readonly control: LinkBytes,
    private readonly emit: (event: StatsEvent) => void,
  ) {
    this.#ranks = new Map(ranks.map((r) => [r.rank, { rank: r.rank, device: r.device, steps: 0, samples: 0, compute_ms: null, comm_ms: null, unsettled: null }]));
    // Coalesced: --json output and the views get at most two a second, however fast steps are.
    this.#timer = setInterval(() => this.flush(), STATS_INTERVAL_MS);
    this.#timer.unref();
  }

  /** Every ring link of the job counts its bytes (FrameLink counts whole frames). */
  track(link: FrameLink): void {
    if (this.#ringLinks.has(link)) return;
    this.#ringLinks.add(link);
    link.onClose(() => {
      if (!this.#ringLinks.delete(link)) return;
      this.#closedRing.sent += link.bytesSent;
      this.#closedRing.received += link.bytesReceived;
    });
  }

  /** A report passed on: a round's report (one with a step, samples and timings) counts until an abort takes it back. */
  observe(rank: number, report: Record<string, unknown>): void {
    const { step, samples, compute_s: compute, comm_s: comm } = report;
    const r = this.#ranks.get(rank);
    if (!r || typeof step !== "number" || typeof samples !== "number" || typeof compute !== "number" || typeof comm !== "number") return;
    r.steps += 1;
    r.samples += samples;
    r.compute_ms = compute * 1000;
    r.comm_ms = comm * 1000;
    r.unsettled = { step, samples };
    if (step !== this.#lastStep) this.#stepsTakenPart += 1;
    this.#lastStep = step;
  }

  /** The coordinator abandoned `step`: shares reported for it were not counted there either. */
  aborted(step: number): void {
    let took = false;
    for (const r of this.#ranks.values()) {
      if (r.unsettled?.step !== step) continue;
      r.steps -= 1;
      r.samples -= r.unsettled.samples;
      r.unsettled = null;
      took = true;
    }
    if (took && this.#lastStep === step) {
      this.#stepsTakenPart -= 1;
      this.#lastStep = step - 1;
    }
  }

  event(): StatsEvent {
    const ranks = [...this.#ranks.values()].map(({ unsettled: _u, ...r }) => r);
    const ring = { ...this.#closedRing };
    for (const link of this.#ringLinks) {
      ring.sent += link.bytesSent;
      ring.received += link.bytesReceived;
    }
    return {
      type: "stats",
      job: this.job.job,
      name: this.job.name,
      elapsed_s: (Date.now() - this.#startedAt) / 1000,
      step: this.#lastStep + 1,
      steps: this.#stepsTakenPart,
      samples: ranks.reduce((n, r) => n + r.samples, 0),
      ranks,
      ring,
      control: { ...this.control },
    };
  }

  /** A `stats` event, unless no figure changed since the last one (elapsed time aside). */
  flush(): void {
    const event = this.event();
    const { elapsed_s: _elapsed, ...figures } = event;
    const key = JSON.stringify(figures);
    if (key === this.#last) return;
    this.#last = key;
    this.emit(event);
  }

  stop(): void {
    clearInterval(this.#timer);
    this.flush(); // the final figures, whatever the interval
  }
}
