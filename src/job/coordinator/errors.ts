import { UserError } from "../../errors.js";

export class JobFailed extends UserError {}
export { TaskFailed } from "../../errors.js";

/** Something a job survives: a provider lost, a worker dead, a ring cut. */
export interface Fault {
  kind: "provider lost" | "worker died" | "ring broken";
  /** Ranks gone with it (none for a ring cut between live members). */
  ranks: number[];
  reason: string;
  /** Date.now() when the coordinator learnt of it. */
  at: number;
}

/** Interrupts the exchanges in flight: the run loop recovers, then goes on. */
export class FaultError extends Error {
  constructor(readonly fault: Fault) {
    super(`${fault.kind}: ${fault.reason}`);
  }
}

export function taskErrorHint(kind: string): string | undefined {
  if (kind === "task") return "The error is in the task file: fix it and run `nimble train` again.";
  if (kind === "requirements") return "Check `requirements:` in the config (names, versions, wheels for the provider's platform) and that the provider can reach its package index.";
  return undefined;
}
