/**
 * One local rank's lifecycle, as one explicit state and one transition function.
 *
 * spawning: its worker process loads the task and model. loaded: it answered `ready`, and
 * is not in a ring (its first ring is forming, or it waits to join). in_ring: loaded and
 * linked into the ring of the current epoch. stepping: it has been given rounds in a ring.
 * restarting: its worker died and is starting again (it rejoins as a joiner). left: out of
 * the job (left out of the ring, or it kept crashing). stopped: the job ended.
 */
export type RankState = "spawning" | "loaded" | "in_ring" | "stepping" | "restarting" | "left" | "stopped";

export type RankEvent =
  /** The worker answered `ready`. */
  | "loaded"
  /** Both ring links of the current epoch are up (or the ring has one member). */
  | "linked"
  /** The ring re-forms: links of the old epoch close. */
  | "unlinked"
  /** A round order went to the worker. */
  | "round"
  /** The worker died and is started again. */
  | "crashed"
  /** Left out of the ring, or it crashed more often than faults.max_restarts. */
  | "left"
  | "stopped";

const TRANSITIONS: Record<RankState, Partial<Record<RankEvent, RankState>>> = {
  spawning: { loaded: "loaded", crashed: "restarting", left: "left", stopped: "stopped" },
  restarting: { loaded: "loaded", crashed: "restarting", left: "left", stopped: "stopped" },
  loaded: { linked: "in_ring", unlinked: "loaded", crashed: "restarting", left: "left", stopped: "stopped" },
  in_ring: { round: "stepping", linked: "in_ring", unlinked: "in_ring", crashed: "restarting", left: "left", stopped: "stopped" },
  // A rank that steps keeps stepping across ring re-forms: the ring changes beneath it.
  stepping: { round: "stepping", linked: "stepping", unlinked: "stepping", crashed: "restarting", left: "left", stopped: "stopped" },
  left: { left: "left", stopped: "left", crashed: "left", unlinked: "left" },
  stopped: { stopped: "stopped", crashed: "stopped", left: "stopped", unlinked: "stopped" },
};

/** The state after `event`; throws for an event the state cannot take (a bug, not input). */
export function transition(state: RankState, event: RankEvent): RankState {
  const next = TRANSITIONS[state][event];
  if (!next) throw new Error(`a rank that is ${state} cannot take "${event}"`);
  return next;
}

/** Taking part in the job's work: loaded and not out of it. */
export const isLoaded = (s: RankState): boolean => s === "loaded" || s === "in_ring" || s === "stepping";
/** Out of the job for good (this job). */
export const isGone = (s: RankState): boolean => s === "left" || s === "stopped";

/** How the provider's views name a state (the `worker` event's `state`). */
export type WorkerState = "starting" | "restarting" | "ready" | "training" | "left" | "stopped";

export function viewState(s: RankState): WorkerState {
  switch (s) {
    case "spawning":
      return "starting";
    case "loaded":
    case "in_ring":
      return "ready";
    case "stepping":
      return "training";
    default:
      return s;
  }
}
