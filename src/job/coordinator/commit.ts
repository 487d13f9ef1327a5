/**
 * The commit (protocol v2, docs/protocol.md "Two-phase rounds"): every round ends with one
 * decision, commit (every replica applies it) or abort (every replica drops it). `decide`
 * is the one place the coordinator makes it; the decision then rides on the first orders
 * sent after it (no extra message) or, at the end of a job and before recovery, goes out
 * in an explicit flush (`decide`). Verification and credits hook in at `decide`.
 */
export type Verdict = "commit" | "abort";

export interface Decision {
  step: number;
  verdict: Verdict;
}

/** Why a round ends: all its reports are in and agree, or a fault interrupted it. */
export type RoundEnd = "reported" | "fault";

export function verdictFor(end: RoundEnd): Verdict {
  return end === "reported" ? "commit" : "abort";
}

export class Commits {
  /** The last decision, and whether it has been sent yet. */
  #last: Decision | null = null;
  #sent = true;

  /** Round `step` ended: decide it. The decision waits for the next orders (or a flush). */
  decide(step: number, end: RoundEnd): Decision {
    if (!this.#sent && this.#last) throw new Error(`round ${this.#last.step}'s decision was never sent before round ${step}'s`);
    this.#last = { step, verdict: verdictFor(end) };
    this.#sent = false;
    return this.#last;
  }

  /** The decision to carry on the next orders every member receives, if one is waiting. */
  ride(): { decision?: Decision } {
    if (this.#sent || !this.#last) return {};
    this.#sent = true;
    return { decision: this.#last };
  }

  /** The explicit flush of the last decision (sent again when it already rode: applying it twice is a no-op). */
  flush(): Decision | null {
    this.#sent = true;
    return this.#last;
  }

  /** A decision is made and not sent. */
  get waiting(): boolean {
    return !this.#sent;
  }
}
