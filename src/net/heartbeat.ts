import type { Socket } from "node:net";
import WebSocket from "ws";

export interface HeartbeatOptions {
  /** A peer silent this long (no pong, no data) is dead. */
  timeoutMs: number;
  /** How often to ping; default a quarter of the timeout. */
  intervalMs?: number;
  /** Called once, with how long the peer had been silent; the socket is then terminated. */
  onDead: (silentMs: number) => void;
}

/**
 * Detects a dead, hung or cut-off peer on a WebSocket: pings it every interval and counts
 * anything that arrives (a pong, a message, or the raw bytes of a large message still in
 * transit) as a sign of life. A process stopped with SIGSTOP keeps its TCP connections open
 * but answers no pings, so it is caught here, not by the socket closing. Returns a stop
 * function; the watch also ends when the socket closes.
 */
export function watchHeartbeat(ws: WebSocket, opts: HeartbeatOptions): () => void {
  const interval = opts.intervalMs ?? Math.max(50, Math.floor(opts.timeoutMs / 4));
  let lastHeard = performance.now();
  const heard = () => {
    lastHeard = performance.now();
  };
  // ws keeps the socket private; its raw data events show progress inside a large message.
  const socket = (ws as unknown as { _socket?: Socket })._socket;
  ws.on("pong", heard);
  ws.on("ping", heard);
  ws.on("message", heard);
  socket?.on("data", heard);
  const timer = setInterval(() => {
    const silent = performance.now() - lastHeard;
    if (silent > opts.timeoutMs) {
      stop();
      opts.onDead(silent);
      ws.terminate();
      return;
    }
    if (ws.readyState === WebSocket.OPEN) ws.ping();
  }, interval);
  timer.unref();
  const stop = () => {
    clearInterval(timer);
    ws.off("pong", heard);
    ws.off("ping", heard);
    ws.off("message", heard);
    socket?.off("data", heard);
  };
  ws.once("close", stop);
  return stop;
}
