import type { PipeChannel } from "../../collective/pipe.js";

/**
 * Pipeline: the states this provider keeps of other providers' sole-held stages, one per
 * stage (the latest checkpoint's), in its own memory rather than a worker's, until the
 * stage's replacement asks for it.
 */
export class MirrorStore {
  readonly #kept = new Map<number, { tag: string; data: Uint8Array }>();

  /** Receive stage `stage`'s state under `tag` on `pipe` and keep it (replacing an older one); its bytes. */
  async take(pipe: PipeChannel, stage: number, tag: string): Promise<number> {
    const data = await pipe.recv(tag);
    this.#kept.set(stage, { tag, data });
    return data.byteLength;
  }

  /** Send the kept state of `stage` on `pipe` under `tag`; the bytes sent (frames included). */
  async give(pipe: PipeChannel, stage: number, tag: string): Promise<number> {
    const kept = this.#kept.get(stage);
    if (!kept) throw new Error(`this provider keeps no state of stage ${stage}`);
    return (await pipe.send(tag, kept.data)).bytesSent;
  }

  has(stage: number): boolean {
    return this.#kept.has(stage);
  }
}
