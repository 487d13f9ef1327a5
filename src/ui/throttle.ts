/**
 * Runs `fn` at most once per `intervalMs`: a request inside the window is coalesced into one
 * run at its end, so a burst of events costs one re-render, and the last state always shows.
 */
export class Throttle {
  private last = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly fn: () => void,
    private readonly intervalMs: number,
  ) {}

  /** Run now if the window has passed, else once when it does. */
  request(): void {
    const wait = this.intervalMs - (Date.now() - this.last);
    if (wait <= 0) this.flush();
    else if (!this.timer) {
      this.timer = setTimeout(() => this.flush(), wait);
      this.timer.unref?.();
    }
  }

  /** Run now, dropping a pending run. */
  flush(): void {
    this.cancel();
    this.last = Date.now();
    this.fn();
  }

  /** Drop a pending run. */
  cancel(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** Count the window from now (after a render made elsewhere). */
  touch(): void {
    this.last = Date.now();
  }
}
