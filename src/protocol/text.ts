/**
 * Text that arrives from outside (a peer's log line, a worker's error, a close reason)
 * before it is printed, logged or forwarded: control characters (terminal escapes among
 * them) become U+FFFD, and an over-long text is cut to `max` characters, keeping its head
 * and tail and saying how much was cut. Never a reason to drop the peer.
 */
// C0 controls but tab and newline, DEL, and C1 controls (CSI among them).
const CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g;

export function cleanText(text: string, max: number, opts: { multiline?: boolean } = {}): string {
  let s = text.replace(CONTROL, "\ufffd");
  if (!opts.multiline) s = s.replace(/[\n]/g, " ");
  return cutText(s, max);
}

/** `text`, or its head and tail with a note of how many characters were cut between them. */
export function cutText(text: string, max: number): string {
  if (text.length <= max) return text;
  const note = ` … [${text.length - max} characters cut] … `;
  const keep = Math.max(0, max - note.length);
  const head = Math.ceil(keep * 0.75);
  return text.slice(0, head) + note + text.slice(text.length - (keep - head));
}

/** Longest text field a provider forwards: what the coordinator's schema accepts for log lines and errors. */
export const MAX_PEER_TEXT = 16 * 1024;
