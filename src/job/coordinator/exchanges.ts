import type { Answer, AnswerKind } from "./answers.js";
import { JobFailed } from "./errors.js";

export type MessageOf<K extends AnswerKind> = Extract<Answer, { t: K }>;

interface Wait {
  kind: AnswerKind;
  match: (m: Answer) => boolean;
  from: readonly number[];
  got: Map<number, Answer>;
  resolve: (got: Map<number, Answer>) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

/**
 * The coordinator's exchanges with its workers: each collects one message of a kind from
 * every rank it names, matched by a predicate (the step, the kind of state). Several may be
 * in flight at once (a round's reports and another round's, an evaluation beside a step):
 * a message goes to every exchange that wants it.
 *
 * A recoverable fault interrupts every exchange in flight (or, when none is, the next one
 * opened); a failure rejects them all, and every later one, for good.
 */
export class Exchanges {
  readonly #waits = new Set<Wait>();
  #failure: Error | null = null;
  #interrupted: Error | null = null;

  /** Open an exchange: the messages of `kind` from ranks `from` (those of `match`). */
  expect<K extends AnswerKind>(
    kind: K,
    what: string,
    from: readonly number[],
    timeoutMs: number,
    match: (m: MessageOf<K>) => boolean = () => true,
  ): Promise<Map<number, MessageOf<K>>> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#interrupted) {
      const err = this.#interrupted;
      this.#interrupted = null;
      return Promise.reject(err);
    }
    const exchange = new Promise<Map<number, MessageOf<K>>>((resolve, reject) => {
      const wait: Wait = {
        kind,
        match: match as (m: Answer) => boolean,
        from: [...from],
        got: new Map(),
        resolve: resolve as (got: Map<number, Answer>) => void,
        reject,
        timer: setTimeout(() => {
          this.#waits.delete(wait);
          const missing = wait.from.filter((r) => !wait.got.has(r));
          reject(new JobFailed(`Timed out after ${timeoutMs / 1000} s waiting for ${what} from rank(s) ${missing.join(", ")}`));
        }, timeoutMs),
      };
      this.#waits.add(wait);
      if (wait.from.length === 0) this.#settle(wait);
    });
    // An exchange opened early and awaited later may be rejected meanwhile: that is its
    // awaiter's to handle, not an unhandled rejection.
    exchange.catch(() => {});
    return exchange;
  }

  /** A worker's message: to every exchange in flight that wants it. */
  deliver(message: Answer): void {
    for (const w of [...this.#waits]) {
      if (w.kind !== message.t || !w.from.includes(message.rank) || !w.match(message)) continue;
      w.got.set(message.rank, message);
      if (w.got.size === w.from.length) this.#settle(w);
    }
  }

  #settle(w: Wait) {
    clearTimeout(w.timer);
    this.#waits.delete(w);
    w.resolve(w.got);
  }

  /** How many exchanges are in flight. */
  get inFlight(): number {
    return this.#waits.size;
  }

  /** A recoverable fault: reject the exchanges in flight (or the next one), not for good. */
  interrupt(err: Error): void {
    if (this.#waits.size === 0) {
      this.#interrupted = err;
      return;
    }
    this.#rejectAll(err);
  }

  /** Faults noted while recovering are handled by that recovery: they interrupt nothing later. */
  clearInterrupt(): void {
    this.#interrupted = null;
  }

  fail(err: Error): void {
    if (this.#failure) return;
    this.#failure = err;
    this.#rejectAll(err);
  }

  #rejectAll(err: Error) {
    for (const w of [...this.#waits]) {
      clearTimeout(w.timer);
      this.#waits.delete(w);
      w.reject(err);
    }
  }
}
