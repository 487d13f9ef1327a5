/**
 * Reusable send buffers for a ring's full-size chunk frames. A buffer goes back once the
 * socket has taken its bytes (FrameLink.send's onWritten), so a steady all-reduce
 * allocates no frame buffers: fewer large short-lived allocations, less garbage collection.
 * Holds at most `max` free buffers (the link's high-water mark keeps fewer in flight).
 */
export class FramePool {
  private readonly free: Buffer[] = [];

  constructor(
    readonly frameBytes: number,
    readonly max = 32,
  ) {}

  /** A buffer of frameBytes (contents undefined). */
  take(): Buffer {
    // past Buffer's pool size a buffer has an ArrayBuffer of its own: the payload is aligned
    return this.free.pop() ?? Buffer.allocUnsafe(this.frameBytes);
  }

  /** Give back a buffer from `take` whose bytes nothing reads any more. */
  give(buf: Buffer): void {
    if (this.free.length < this.max) this.free.push(buf);
  }

  /** Free buffers held now. */
  get size(): number {
    return this.free.length;
  }
}
