import { PipelineStrategy, StageLostError } from "../../strategy/pipeline.js";
import { replaceFromMirror } from "./pipelinePhases.js";
import { FaultError, JobFailed, type Fault } from "./errors.js";
import { quorum, type Quorum } from "./membership.js";
import type { Phase } from "./phase.js";
import { checkHashes, flushDecision } from "./phases.js";
import { sendOrder } from "./orders.js";
import { type Run, RING_TIMEOUT_MS, STEP_TIMEOUT_MS } from "./run.js";

/** Recoveries interrupted by yet another fault before the job gives up. */
const MAX_RECOVERY_ATTEMPTS = 5;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Re-form the ring (a new epoch) with `members`, once each of them is linked. */
export async function reformRing(run: Run, members: readonly number[], what: string): Promise<void> {
  const epoch = run.membership.reform(members);
  const formed = run.exchanges.expect("ring_ready", what, members, RING_TIMEOUT_MS);
  let groups;
  try {
    groups = run.strategy.groupsFor(members);
  } catch (err) {
    if (!(err instanceof StageLostError)) throw err;
    throw new JobFailed(
      `Pipeline stage ${err.stage} was lost: no worker left holds it (ranks ${members.join(", ")} remain)`,
      "Give each stage a replica (more workers than pipeline_stages), or continue from the last checkpoint with `nimble train --resume RUN_DIR`.",
    );
  }
  run.providers.broadcast({ t: "ring", epoch, members: [...members], urls: run.providers.ringPeers(), ...(groups ? { groups } : {}) });
  await formed;
}

/** Where a fault struck: in round `step` (its orders `sent` or not), or between rounds. */
export interface FaultedAt {
  step: number | null;
  sent: boolean;
}

/**
 * Survive the faults noticed so far: name who is lost, decide the round in flight (abort)
 * or flush the last decision, re-form the ring without the lost ranks and split the work
 * among the rest; below faults.min_workers, wait for providers to come back. Retried when
 * another fault strikes meanwhile.
 */
export async function recover(run: Run, at: FaultedAt): Promise<number | null> {
  const resume: Phase = run.phase() === "finishing" ? "finishing" : "training";
  for (let attempt = 1; ; attempt++) {
    run.enter("recovering");
    try {
      const faults = await settleFaults(run);
      await dropLost(run, faults, at);
      at = { step: at.step, sent: false };
      run.enter(resume);
      let back = await waitForQuorum(run, at.step ?? run.tally.stepsDone, faults);
      back ??= await waitForReplacement(run, at.step ?? run.tally.stepsDone);
      const active = run.membership.active;
      run.status(
        `Ring re-formed with ${active.length} worker${active.length === 1 ? "" : "s"} (ranks ${active.join(", ")})` +
          (at.step !== null ? `; redoing step ${at.step} with shares ${run.strategy.shares.join(" : ")}` : ""),
      );
      run.report({ type: "workers", workers: run.providers.rows() });
      return back;
    } catch (err) {
      run.enter(resume);
      if (!(err instanceof FaultError)) throw err;
      if (attempt >= MAX_RECOVERY_ATTEMPTS) throw new JobFailed(`Could not recover after ${attempt} attempts: ${err.message}`);
    }
  }
}

/**
 * Let faults that happen together surface (a killed host drops its control and ring links
 * at once); a ring cut with nobody known lost waits out one heartbeat for a loss.
 */
async function settleFaults(run: Run): Promise<Fault[]> {
  await sleep(300);
  const deadline = Date.now() + run.config.faults.heartbeat_s * 1000 + 2000;
  const onlyCuts = () => run.membership.pendingFaults.every((f) => f.ranks.length === 0);
  while (run.membership.pendingFaults.length > 0 && onlyCuts() && Date.now() < deadline) await sleep(100);
  const faults = run.membership.takeFaults();
  // Faults noted while settling are handled here: they need not interrupt this recovery.
  run.exchanges.clearInterrupt();
  return faults;
}

function describe(faults: Fault[]): string {
  return faults.map((f) => `${f.kind} (${f.reason})`).join("; ");
}

/** The lost leave: the round in flight is aborted (or the last decision flushed), the ring re-forms. */
async function dropLost(run: Run, faults: Fault[], at: FaultedAt): Promise<void> {
  const { membership, providers } = run;
  run.tally.recordFaults(at.step ?? run.tally.stepsDone, faults);
  const lost = faults.flatMap((f) => f.ranks);
  const q = currentQuorum(run, lost, null, describe(faults));
  if (q.decision === "fail") throw new JobFailed(q.reason, q.hint);
  for (const r of q.dropped) providers.ranks[r].row.state = "lost";
  const stay = membership.active.filter((r) => !q.dropped.includes(r));
  if (at.step !== null && at.sent) {
    // The round in flight is dropped everywhere (its orders carried the last decision).
    run.commits.decide(at.step, "fault");
    await flushDecision(run, `workers abandoning step ${at.step}`, "", undefined, stay);
  } else {
    // Between rounds: the last decision, whether or not an order carried it yet.
    await flushDecision(run, "workers applying the last step", "after a fault between steps", undefined, stay);
  }
  await reformRing(run, stay, `the ring re-forming without rank(s) ${q.dropped.join(", ") || "(none)"}`);
  if (at.step !== null && at.sent) run.tally.recordRedone(at.step);
  run.strategy.membersChanged({ members: stay, left: q.dropped, joined: [] });
}

function currentQuorum(run: Run, lost: readonly number[], shortSince: number | null, cause?: string): Quorum {
  const { membership, config } = run;
  const { min_workers: minWorkers, wait_s: waitS } = config.faults;
  return quorum({ active: membership.active, lost, joiners: membership.joiners, minWorkers, waitMs: waitS * 1000, shortSince, cause }, Date.now());
}

/** Below faults.min_workers: wait for providers to come back (or restarted workers), then bring them in. */
async function waitForQuorum(run: Run, step: number, faults: Fault[]): Promise<number | null> {
  let q = currentQuorum(run, [], null);
  if (q.decision !== "wait") return null;
  const shortSince = Date.now();
  run.status(`Waiting up to ${run.config.faults.wait_s} s for providers: ${q.reason}`, "warn");
  while (q.decision === "wait") {
    await sleep(250);
    q = currentQuorum(run, [], shortSince, describe(faults));
  }
  if (q.decision === "fail") throw new JobFailed(q.reason, q.hint);
  return admit(run, step);
}

/**
 * Pipeline: a stage lost with its only holder (its state mirrored at the last checkpoint)
 * waits, up to faults.wait_s, for a worker of that stage to come back (a restarted worker,
 * its provider back), which then takes the stage over from the mirror.
 */
async function waitForReplacement(run: Run, step: number): Promise<number | null> {
  const strategy = run.strategy;
  if (!(strategy instanceof PipelineStrategy)) return null;
  const lost = () => strategy.lost(run.membership.active);
  if (lost().length === 0) return null;
  const covered = () => lost().every((s) => run.membership.joiners.some((r) => strategy.layout.stageOf[r] === s));
  run.status(`Waiting up to ${run.config.faults.wait_s} s for a worker to take over stage ${lost().join(", ")} from its mirror`, "warn");
  const deadline = Date.now() + run.config.faults.wait_s * 1000;
  while (!covered() && Date.now() < deadline) await sleep(250);
  if (!covered()) {
    throw new JobFailed(
      `Pipeline stage ${lost().join(", ")} was lost with its only worker, and none came back to take it over within faults.wait_s (${run.config.faults.wait_s} s)`,
      "Its state is mirrored at a peer and in the last checkpoint: continue with `nimble train --resume RUN_DIR`, or give each stage a replica.",
    );
  }
  return admit(run, step);
}

/**
 * Bring ranks that are loaded and waiting (restarted workers, providers that came back or
 * joined) into the ring before `step`: the ring re-forms with them, every member takes one
 * current member's whole training state over the ring, and the work is split anew.
 */
export async function admit(run: Run, step: number): Promise<number | null> {
  const { membership, providers } = run;
  const q = currentQuorum(run, [], null);
  if (q.decision !== "quorum" || q.joining.length === 0) return null;
  const newcomers = q.joining;
  const source = membership.active[0];
  // Pipeline: stages no member holds now (lost with their only worker), before the ring takes the newcomers in.
  const strategy = run.strategy;
  const lostStages = strategy instanceof PipelineStrategy ? strategy.lost(membership.active) : [];
  const names = newcomers.join(", ");
  await reformRing(run, q.members, `the ring re-forming with rank(s) ${names}`);
  // Under pipeline each stage's holders hand over among themselves (over their stage's ring).
  const handovers = run.strategy.handovers(q.members, newcomers) ?? [{ source, members: q.members }];
  const synced = run.exchanges.expect("synced_state", `the current state reaching the new members`, handovers.flatMap((h) => h.members), STEP_TIMEOUT_MS);
  const decision = run.commits.ride();
  for (const h of handovers) sendOrder(providers, h.members, { op: "sync_state", source: h.source, ...decision });
  const got = await synced;
  checkHashes([...got.keys()], got, `after rank(s) ${names} took the current state`, (r) => run.strategy.hashGroup(r));
  for (const [rank, m] of got) {
    if (m.step !== step) throw new JobFailed(`Rank ${rank} is at step ${m.step} after taking rank ${source}'s state, not ${step}`);
  }
  // Pipeline: a stage whose only holder was lost is taken over from its mirror; training goes back to it.
  let back: number | null = null;
  if (strategy instanceof PipelineStrategy) {
    const replacing = lostStages.flatMap((stage) => {
      const rank = newcomers.find((r) => strategy.layout.stageOf[r] === stage);
      return rank === undefined ? [] : [{ stage, rank }];
    });
    if (replacing.length > 0) back = await replaceFromMirror(run, strategy, q.members, replacing);
  }
  for (const r of newcomers) providers.ranks[r].row.state = "training";
  run.strategy.membersChanged({ members: q.members, left: [], joined: newcomers });
  const shares = run.strategy.shares.join(" : ");
  run.status(`Rank${newcomers.length === 1 ? "" : "s"} ${names} joined before step ${step} with rank ${source}'s state; ${q.members.length} workers, shares ${shares}`);
  run.report({ type: "workers", workers: providers.rows() });
  return back;
}

/**
 * Weigh each member's measured speed and link against what it adds; leave out those that
 * make every step slower, and re-form the ring without them.
 */
export async function leaveOutSlow(run: Run, step: number, stepBytesPerWorker: number): Promise<void> {
  const { providers, tally } = run;
  const links = new Map(tally.links.flatMap((l) => (l.upload_bytes_per_s === null ? [] : [[l.rank, l.upload_bytes_per_s] as const])));
  const out = run.strategy.leaveOut((rank) => `rank ${rank} (${providers.ranks[rank].row.id})`, links, stepBytesPerWorker);
  if (out.length === 0) return;
  for (const e of out) {
    const row = providers.ranks[e.rank].row;
    row.state = "left out";
    row.share = 0;
    tally.recordLeftOut({ rank: e.rank, id: row.id, after_step: step, reason: e.reason });
    run.status(`Leaving out ${e.reason}`, "warn");
  }
  const gone = out.map((e) => e.rank);
  const stay = run.membership.active.filter((r) => !gone.includes(r));
  await reformRing(run, stay, `the ring re-formed without rank(s) ${gone.join(", ")}`);
  run.strategy.membersChanged({ members: stay, left: gone, joined: [] });
  run.report({ type: "workers", workers: providers.rows() });
}
