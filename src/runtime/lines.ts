import type { Readable } from "node:stream";

/** Longest line kept from a child's output; the rest of a longer one is dropped, and said so. */
export const MAX_LINE_CHARS = 16 * 1024;

/**
 * Call `onLine` with each non-empty line a child process writes to `stream`. Memory stays
 * bounded whatever the child writes: a line longer than `maxChars` is cut there (with a
 * note of how much was dropped) and nothing more of it is buffered.
 */
export function forEachLine(stream: Readable | null | undefined, onLine: (line: string) => void, maxChars = MAX_LINE_CHARS): void {
  if (!stream) return;
  stream.setEncoding("utf8");
  let line = "";
  /** Characters dropped from the line being read (0: not cut). */
  let dropped = 0;
  const emit = () => {
    const text = line.replace(/\r$/, "");
    if (dropped > 0) onLine(`${text} … [line cut: ${dropped} more characters]`);
    else if (text.trim()) onLine(text);
    line = "";
    dropped = 0;
  };
  stream.on("data", (chunk: string) => {
    let at = 0;
    while (at < chunk.length) {
      const nl = chunk.indexOf("\n", at);
      const piece = chunk.slice(at, nl < 0 ? chunk.length : nl);
      const room = maxChars - line.length;
      if (piece.length <= room) line += piece;
      else {
        line += piece.slice(0, Math.max(0, room));
        dropped += piece.length - Math.max(0, room);
      }
      if (nl < 0) break;
      emit();
      at = nl + 1;
    }
  });
  stream.on("end", () => {
    if (line || dropped) emit();
  });
}
