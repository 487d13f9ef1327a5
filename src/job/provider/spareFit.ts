import type { WorkerLimits } from "../../runtime/limits.js";

/**
 * What a worker process is started with that a job cannot change once it runs: the
 * interpreter (and so its environment), the confinement and what it binds read-only, the
 * devices it sees and the owner's limits. The job folder is not here: a spare is started
 * in an empty one of its own, which becomes its job's folder.
 */
export interface WorkerSetup {
  python: string;
  sandbox: "bwrap" | "none";
  /** Folders bound read-only into the sandbox beyond the system's (the environment's prefixes, the runtime). */
  readOnly: readonly string[];
  /** Device nodes bound in (a GPU's), and the torch device it runs on. */
  devices: readonly string[];
  device: string;
  limits: WorkerLimits;
}

/** What a job's worker needs that a spare started before it may lack. */
export interface JobNeeds extends WorkerSetup {
  /** The lock hash of the job's own requirements (installed beside the base environment), or null. */
  requirements: string | null;
}

export type SpareVerdict = { use: true } | { use: false; why: string };

/**
 * Can this job's worker be the warm spare? Only when the spare is exactly what a cold
 * start would make: anything the job adds to the sandbox or the environment (requirements,
 * other binds, another device, other limits) cannot be added to a process already running
 * under bubblewrap, so such a job starts its worker cold, and `why` says so.
 */
export function canUseSpare(spare: (WorkerSetup & { alive: boolean }) | null, job: JobNeeds): SpareVerdict {
  if (!spare) return { use: false, why: "no warm worker is kept for this device" };
  if (!spare.alive) return { use: false, why: "the warm worker has exited" };
  if (job.requirements) return { use: false, why: `the job brings requirements (lock ${job.requirements.slice(0, 12)}), which the warm worker's environment lacks` };
  if (job.python !== spare.python) return { use: false, why: `the job runs ${job.python}, the warm worker ${spare.python}` };
  if (job.sandbox !== spare.sandbox) return { use: false, why: `the job is ${describe(job.sandbox)}, the warm worker ${describe(spare.sandbox)}` };
  const missing = job.readOnly.filter((d) => !spare.readOnly.includes(d));
  if (missing.length > 0) return { use: false, why: `the job needs ${missing.join(", ")} bound read-only, which the warm worker's sandbox lacks` };
  // Nor may the job see more than a cold start would show it.
  const extra = spare.readOnly.filter((d) => !job.readOnly.includes(d));
  if (extra.length > 0) return { use: false, why: `the warm worker's sandbox also binds ${extra.join(", ")}, which this job's would not` };
  if (job.device !== spare.device || !sameSet(job.devices, spare.devices)) return { use: false, why: `the job's worker runs on ${job.device}, the warm worker on ${spare.device}` };
  const limit = (Object.keys(job.limits) as (keyof WorkerLimits)[]).find((k) => job.limits[k] !== spare.limits[k]);
  if (limit) return { use: false, why: `the job's ${limit} is ${job.limits[limit]}, the warm worker's ${spare.limits[limit]}` };
  return { use: true };
}

function describe(sandbox: WorkerSetup["sandbox"]): string {
  return sandbox === "bwrap" ? "confined" : "unconfined";
}

function sameSet(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((x) => b.includes(x));
}
