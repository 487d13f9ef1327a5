import type { Answer, Incoming } from "./answers.js";
import type { Fault } from "./errors.js";
import { survivesFaults, type Phase } from "./phase.js";

type Failed = Extract<Incoming, { t: "failed" }>;

/** What a provider's message means, given the phase and the ring now. */
export type Route =
  | { action: "log" }
  /** A worker found the config impossible for this model: a config error with its line. */
  | { action: "config error"; field: string; message: string }
  /** The job survives it: recover, then go on. */
  | { action: "fault"; fault: Omit<Fault, "at"> }
  /** News of a rank out of the ring already (it crashed again while restarting, or gave up). */
  | { action: "retell"; rank: number; message: string }
  | { action: "fail"; message: string; kind: Failed["kind"]; where?: string }
  /** A loaded worker waiting to enter the ring at the next round boundary. */
  | { action: "joiner"; rank: number }
  /** An answer for the exchanges in flight. */
  | { action: "deliver"; message: Answer }
  | { action: "send package"; hash: string }
  | { action: "ignore" };

export interface RouteState {
  phase: Phase;
  /** The ring's epoch now: reports of an older ring say nothing new. */
  epoch: number;
  isActive: (rank: number) => boolean;
  /** The rank exists and this provider hosts it. */
  hosts: (rank: number) => boolean;
}

/** Pure: decides what a message from provider `address` means (the run loop acts on it; its text was cleaned at intake, `unpack`). */
export function route(m: Incoming, address: string, state: RouteState): Route {
  const surviving = survivesFaults(state.phase);
  switch (m.t) {
    case "log":
      return { action: "log" };
    case "failed": {
      if (m.kind === "config" && m.field) return { action: "config error", field: m.field, message: m.message };
      if (m.kind === "worker" && m.rank !== undefined && surviving) {
        if (state.isActive(m.rank)) return { action: "fault", fault: { kind: "worker died", ranks: [m.rank], reason: m.message } };
        return { action: "retell", rank: m.rank, message: m.message };
      }
      const who = m.rank !== undefined ? `rank ${m.rank} on provider ${address}` : `provider ${address}`;
      return { action: "fail", message: `${who} failed: ${m.where ? `${m.where}: ` : ""}${m.message}`, kind: m.kind, ...(m.where ? { where: m.where } : {}) };
    }
    case "ring_lost":
      // Reports from a ring already given up (during recovery, or of an older epoch) say nothing new.
      if (m.epoch === state.epoch && state.phase !== "recovering") return { action: "fault", fault: { kind: "ring broken", ranks: [], reason: m.reason } };
      return { action: "ignore" };
    case "ready":
      // A restarted worker, or a provider that (re)joined: brought in at the next round boundary.
      if (surviving && state.hosts(m.rank) && !state.isActive(m.rank)) return { action: "joiner", rank: m.rank };
      return { action: "deliver", message: m };
    case "welcome":
    case "reject":
      return { action: "ignore" };
    case "package_needed":
      return { action: "send package", hash: m.hash };
    default:
      return { action: "deliver", message: m };
  }
}
