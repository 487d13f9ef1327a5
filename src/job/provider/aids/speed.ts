import { readFile } from "node:fs/promises";

/**
 * Testing and benchmarking aid (`--speed`, `--speed-file`): workers run at a fraction of
 * their speed. With a file, its number is re-read every half second and applied mid-run.
 */
export class SpeedAid {
  #speed: number | undefined;
  #timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly base: number | undefined,
    private readonly file: string | undefined,
    /** The speed changed (from the file): tell the workers. */
    private readonly onChange: (speed: number, file: string) => void,
  ) {}

  get current(): number {
    return this.#speed ?? this.base ?? 1;
  }

  /** Read the file once now, then every half second. */
  async start(): Promise<void> {
    await this.#poll();
    if (this.file) this.#timer = setInterval(() => void this.#poll(), 500);
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
  }

  async #poll() {
    if (!this.file) return;
    let text: string;
    try {
      text = await readFile(this.file, "utf8");
    } catch {
      return; // absent: keep the current speed
    }
    const value = Number(text.trim());
    if (!(value > 0 && value <= 1) || value === this.current) return;
    this.#speed = value;
    this.onChange(value, this.file);
  }
}
