/**
 * The coordinator's phase: one explicit state and one transition function. What a fault
 * means depends on it: before training, any fault fails the job; while training (and
 * recovering), the job survives it.
 */
export type Phase = "connecting" | "starting" | "training" | "recovering" | "finishing" | "ended";

const NEXT: Record<Phase, readonly Phase[]> = {
  connecting: ["starting", "ended"],
  starting: ["training", "ended"],
  training: ["recovering", "finishing", "ended"],
  recovering: ["training", "finishing", "ended"],
  // Back to training only when a recovery while finishing went back to a step (a pipeline stage taken over from its mirror).
  finishing: ["recovering", "training", "ended"],
  ended: [],
};

export function transition(from: Phase, to: Phase): Phase {
  if (from === to) return to;
  if (!NEXT[from].includes(to)) throw new Error(`the coordinator cannot go from ${from} to ${to}`);
  return to;
}

/** Faults are survived (queued for recovery) rather than failing the job. */
export const survivesFaults = (phase: Phase): boolean => phase === "training" || phase === "recovering" || phase === "finishing";
