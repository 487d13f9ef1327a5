import { createInterface } from "node:readline";
import type { Readable } from "node:stream";

/** Call `onLine` with each non-empty line a child process writes to `stream`. */
export function forEachLine(stream: Readable | null | undefined, onLine: (line: string) => void): void {
  if (!stream) return;
  createInterface({ input: stream, crlfDelay: Infinity }).on("line", (line) => {
    if (line.trim()) onLine(line);
  });
}
