import { startupLine } from "./startup.js";
import { errorMessage, UserError } from "../../errors.js";
import type { DilocoResult } from "../../strategy/diloco.js";
import type { SyncPlan, SyncResult } from "../../strategy/sync.js";
import type { PipelineResult } from "../../strategy/pipeline.js";
import type { DilocoFigures, PipelineStageRow } from "../events.js";
import type { RoundReport } from "../../strategy/types.js";
import type { CollectiveTiming } from "../../protocol/messages.js";
import { FaultError, JobFailed } from "./errors.js";
import { checkHashes, checkpointFiles, evaluate, finalWeights } from "./phases.js";
import { admit, leaveOutSlow, recover, type FaultedAt } from "./recovery.js";
import { sendOrder } from "./orders.js";
import { controlShare, mayOrderAhead, ordersAheadOn, type OrdersAheadMode, type RoundTiming } from "./ahead.js";
import { type Run, STEP_TIMEOUT_MS } from "./run.js";

/** How often replicas compare parameter hashes (and always on the last step). */
export const HASH_EVERY = 10;

export interface RoundsOptions {
  /** The first round to run (the checkpoint's step when resuming). */
  first: number;
  /** Compare replicas at the first round (after loading a checkpoint, which no broadcast followed). */
  verifyFirst?: boolean;
  valSize: number;
  /** Slow workers may be left out once the first steps are measured. */
  mayLeaveOut: boolean;
  stopRequested: () => boolean;
}

/** Training went back to `step` during a recovery (a pipeline stage taken over from its mirror). */
class RolledBack extends Error {
  constructor(readonly step: number) {
    super(`rolled back to step ${step}`);
  }
}

/** A round whose orders are out: its plan and the exchange of its reports. */
interface SentRound {
  step: number;
  plan: SyncPlan;
  wantHash: boolean;
  sentAt: number;
  reports: Promise<ReadonlyMap<number, RoundReport>>;
}

/** The rounds' orders ahead (ahead.ts): whether they are on, the round ordered ahead, and the timings `auto` decides from. */
class OrdersAhead {
  on: boolean;
  next: SentRound | null = null;
  readonly timings: RoundTiming[] = [];
  constructor(
    readonly mode: OrdersAheadMode,
    private readonly run: Run,
    first: number,
  ) {
    this.on = mode === "on";
    if (mode !== "off") run.tally.ordersAhead = { mode, from_step: this.on ? first : null, control_share: null };
  }
  /** A round timed with nothing ordered ahead (the first, which warms up, is not counted). */
  observe(step: number, first: number, timing: RoundTiming): void {
    if (this.on || this.mode !== "auto" || step === first) return;
    this.timings.push(timing);
    const share = controlShare(this.timings.slice(-3));
    this.on = ordersAheadOn(this.mode, this.timings);
    this.run.tally.ordersAhead = { mode: this.mode, from_step: this.on ? step + 1 : null, control_share: share };
    if (this.on) this.run.status(`Orders ahead from step ${step + 1}: the control round trip took ${(share * 100).toFixed(0)}% of a step`);
  }
}

/** Sync rounds may be ordered ahead; DiLoCo's are long and a pipeline's stages are not replicas. */
function aheadMode(run: Run): OrdersAheadMode {
  const strategy = run.config.strategy;
  if (strategy.name !== "sync" || run.config.parallel || run.strategy.stepsPerRound !== 1) return "off";
  return strategy.orders_ahead;
}

/** Run a phase between rounds (evaluation, checkpoint, final weights), again after any fault. */
async function surviving<T>(run: Run, phase: () => Promise<T>): Promise<T> {
  for (;;) {
    try {
      return await phase();
    } catch (err) {
      if (!(err instanceof FaultError)) throw err;
      const back = await recover(run, { step: null, sent: false });
      if (back !== null) throw new RolledBack(back);
    }
  }
}

/**
 * The rounds, then the final weights: for each round, admit joiners, plan, attempt,
 * decide and record; a fault mid-round aborts it and it runs again on the re-formed ring.
 */
export async function trainRounds(run: Run, opts: RoundsOptions): Promise<{ name: string; data: Uint8Array }[]> {
  const { config } = run;
  /** After a recovery: compare replicas at the next round. */
  let verifyNext = opts.verifyFirst ?? false;
  // A round covers stepsPerRound steps from `step` (sync: one; diloco: inner_steps / fragments).
  const per = run.strategy.stepsPerRound;
  const ahead = new OrdersAhead(aheadMode(run), run, opts.first);
  for (let first = opts.first; ; ) {
    for (let step = first; step < config.steps; step += per) {
      try {
        await runRound(run, opts, step, verifyNext, (v) => (verifyNext = v), ahead);
      } catch (err) {
        if (!(err instanceof RolledBack)) throw err;
        step = err.step - per; // from the mirrored step again
        verifyNext = true;
      }
    }
    run.enter("finishing");
    try {
      return await surviving(run, () => finalWeights(run));
    } catch (err) {
      if (!(err instanceof RolledBack)) throw err;
      run.enter("training"); // a stage lost while finishing was taken over: its last steps again
      first = err.step;
      verifyNext = true;
    }
  }
}

/** One round from `step`: admit joiners, plan, attempt, decide, record, evaluate, checkpoint. Throws RolledBack to run again from a step. */
async function runRound(run: Run, opts: RoundsOptions, step: number, verify: boolean, setVerify: (v: boolean) => void, ahead: OrdersAhead): Promise<void> {
  const { config } = run;
  // Joiners wait while a round is ordered ahead (none is once they are waiting).
  const orderedAhead = ahead.next?.step === step;
  const back = run.membership.joiners.length > 0 && !orderedAhead ? await surviving(run, () => admit(run, step)) : null;
  if (back !== null) throw new RolledBack(back);
  const stepStart = Date.now();
  const attempt = await attemptRound(run, step, verify, ahead, opts);
  if ("fault" in attempt) {
    const back = await recover(run, attempt.fault);
    // Run it again on the re-formed ring (or from the mirrored step).
    throw new RolledBack(back ?? step);
  }
  setVerify(false);
  const result = fold(run, attempt.plan, attempt.reports);
  run.collective?.observe(attempt.reports.values() as Iterable<{ collectives?: CollectiveTiming[] }>, attempt.plan.members.length);
  run.commits.decide(step, "reported");
  recordRound(run, result);
  const end = result.round; // the round's last step
  const evaluation = await maybeEvaluate(run, end, opts.valSize);
  run.dir.appendMetrics(run.tally.metricsOf(result, stepStart, evaluation, dilocoFigures(result)));
  reportRound(run, result, evaluation?.metrics);
  if (opts.mayLeaveOut && step === run.strategy.leaveOutAfter && step < config.steps - 1) {
    await surviving(run, () => leaveOutSlow(run, step, Math.max(...result.workers.map((w) => w.bytes_sent))));
  }
  const stopping = opts.stopRequested() && end < config.steps - 1 && ahead.next === null;
  if ((config.checkpoint.every > 0 && (end + 1) % config.checkpoint.every === 0) || stopping) {
    const files = await surviving(run, () => checkpointFiles(run, end));
    const where = await run.dir.writeCheckpoint(end + 1, files, config.checkpoint.keep);
    run.report({ type: "checkpoint", step: end + 1, path: where });
  }
  if (stopping) {
    throw new UserError(
      `Training cancelled after step ${end + 1} of ${config.steps}`,
      `A checkpoint of step ${end + 1} is in ${run.dir.dir}; continue with \`nimble train --resume ${run.dir.dir}\`.`,
      130,
    );
  }
}

type Attempt = { plan: SyncPlan; reports: ReadonlyMap<number, RoundReport> } | { fault: FaultedAt };

/** Order round `step`: its plan, the exchange for its reports, and its orders (carrying the last decision) out. */
function orderRound(run: Run, step: number, verify: boolean, ahead: boolean): SentRound {
  const { config, membership, providers } = run;
  const per = run.strategy.stepsPerRound;
  const wantHash = (Math.floor(step / per) + 1) % HASH_EVERY === 0 || step + per >= config.steps || verify;
  const plan = run.strategy.plan(step, membership.active, providers.ranks.length, { wantHash });
  const what = per === 1 ? `step ${step}` : `the round of steps ${step}-${step + per - 1}`;
  // A round ordered ahead waits for the round before it too.
  const timeout = ahead ? 2 * STEP_TIMEOUT_MS : STEP_TIMEOUT_MS;
  const reports = run.exchanges.expect(run.strategy.reportOp, what, plan.members, timeout, (m) => m.step === step) as Promise<ReadonlyMap<number, RoundReport>>;
  const decision = run.commits.ride();
  sendOrder(providers, plan.members, { ...run.strategy.order(plan), ...decision, ...(ahead ? { ahead: true } : {}) }, undefined, run.collective?.orderField(plan.members.length));
  return { step, plan, wantHash, sentAt: Date.now(), reports };
}

/**
 * One attempt at round `step`: its orders out (unless they went ahead), the next round's
 * ahead of its reports when it may be, its reports in. The last decision rides on the
 * first orders out, or goes alone (`quiet`: the workers are busy with the round ordered ahead).
 */
async function attemptRound(run: Run, step: number, verify: boolean, ahead: OrdersAhead, opts: RoundsOptions): Promise<Attempt> {
  const { config } = run;
  let sent = false;
  try {
    const round = ahead.next?.step === step ? ahead.next : orderRound(run, step, verify, false);
    ahead.next = null;
    sent = true;
    const next = {
      step,
      steps: config.steps,
      evalEvery: config.eval.every,
      checkpointEvery: config.checkpoint.every,
      leaveOutAfter: opts.mayLeaveOut ? run.strategy.leaveOutAfter : null,
      joinersWaiting: run.membership.joiners.length > 0,
      stopRequested: opts.stopRequested(),
    };
    if (ahead.on && mayOrderAhead(next)) ahead.next = orderRound(run, step + 1, false, true);
    else if (run.commits.waiting) {
      sendOrder(run.providers, round.plan.members, { op: "decide", ...run.commits.ride().decision!, quiet: true });
    }
    const reports = await round.reports;
    ahead.observe(step, opts.first, { wallS: (Date.now() - round.sentAt) / 1000, busyS: busiest(reports) });
    // Hashes are taken before the round's update (which waits for its decision).
    if (round.wantHash) checkHashes(round.plan.members, reports, `before step ${step}`, (r) => run.strategy.hashGroup(r));
    return { plan: round.plan, reports };
  } catch (err) {
    if (!(err instanceof FaultError)) throw err;
    ahead.next = null; // aborting this round aborts the one ordered ahead of it
    return { fault: { step, sent } };
  }
}

/** The longest any worker was busy in a round (compute and collectives). */
function busiest(reports: ReadonlyMap<number, RoundReport>): number {
  let most = 0;
  for (const r of reports.values()) {
    const { compute_s: compute, comm_s: comm } = r as { compute_s?: number; comm_s?: number };
    most = Math.max(most, (compute ?? 0) + (comm ?? 0));
  }
  return most;
}

function fold(run: Run, plan: SyncPlan, reports: ReadonlyMap<number, RoundReport>): SyncResult {
  try {
    return run.strategy.fold(plan, reports);
  } catch (err) {
    throw new JobFailed(errorMessage(err));
  }
}

/** The round's figures into the tally and the workers' rows; warnings it calls for. */
function recordRound(run: Run, result: SyncResult): void {
  const { providers, tally } = run;
  tally.recordStep(result);
  if (!tally.startup.summary) run.status(startupLine(tally.startup.finish()));
  if ("stages" in result) tally.recordPipelineStep(result as PipelineResult);
  const diloco = dilocoFigures(result);
  if (diloco) tally.recordRound(diloco, result.bytesSent);
  for (const w of result.workers) {
    const r = providers.ranks[w.rank];
    if (w.max_micro_batch !== r.maxMicroBatch) {
      // The first report gives the provider's configured cap; a lower one later means memory ran out.
      if (r.maxMicroBatch !== undefined && w.max_micro_batch !== null && (r.maxMicroBatch === null || w.max_micro_batch < r.maxMicroBatch)) {
        run.status(`Rank ${w.rank} (${r.row.device}) ran out of device memory at step ${result.round}: it now accumulates micro-batches of at most ${w.max_micro_batch} samples`, "warn");
      }
      r.maxMicroBatch = w.max_micro_batch;
    }
    Object.assign(r.row, {
      share: w.samples,
      samples: r.row.samples + w.samples,
      compute_s: w.compute_s,
      comm_s: w.comm_s,
      idle_s: w.idle_s,
      bytes_sent: r.row.bytes_sent + w.bytes_sent,
    });
  }
  if (result.sharesChanged) {
    const { shares, rates } = result.sharesChanged;
    run.status(`Step ${result.round + 1}: shares ${shares.join(" : ")} (measured samples/s ${rates.map((x) => x.toFixed(0)).join(" : ")})`, "debug");
  }
  if (result.skipped) {
    const what = result.nonfinite.length ? result.nonfinite.join(", ") : "values in the reduced gradient";
    run.status(`Step ${result.round} skipped on every worker: non-finite ${what}`, "warn");
  }
}

async function maybeEvaluate(run: Run, step: number, valSize: number): Promise<{ metrics: Record<string, number>; seconds: number } | undefined> {
  const every = run.config.eval.every;
  if (!((every > 0 && (step + 1) % every === 0) || step === run.config.steps - 1)) return undefined;
  const start = Date.now();
  const metrics = await surviving(run, () => evaluate(run, step, Math.min(run.config.eval.samples, valSize)));
  run.tally.recordEval(step, metrics);
  return { metrics, seconds: (Date.now() - start) / 1000 };
}

/** A DiLoCo round's own figures (none for sync). */
export function dilocoFigures(result: SyncResult): DilocoFigures | undefined {
  if (!("fragment" in result)) return undefined;
  const r = result as DilocoResult;
  return {
    round: Math.floor(r.firstStep / r.innerSteps),
    inner_steps: r.innerSteps,
    fragment: r.fragment,
    outer_lr: r.outerLr,
    comm_s: Math.max(0, ...r.workers.map((w) => w.comm_s)),
    hidden_s: r.hiddenS,
  };
}

/** The live view's rows of a pipeline step: each stage worker with the layers it holds. */
function stageRows(run: Run, result: PipelineResult): PipelineStageRow[] {
  const b = run.pipelineBounds;
  return result.stages.map(({ act_bytes_sent: _sent, ...s }) => ({ ...s, layers: b ? [b[s.stage], b[s.stage + 1]] : null }));
}

function reportRound(run: Run, result: SyncResult, evalMetrics?: Record<string, number>): void {
  const { tally } = run;
  run.report({
    type: "step",
    step: result.round + 1,
    steps: run.config.steps,
    loss: tally.lastLoss ?? result.loss,
    lr: result.lr,
    samples: tally.samplesDone,
    samples_per_s: tally.recentRate,
    wall_s: (Date.now() - tally.started) / 1000,
    bytes_sent: tally.bytesSent,
    compression_ratio: tally.compressionRatio,
    workers: run.providers.rows(),
    ...(dilocoFigures(result) ? { diloco: dilocoFigures(result) } : {}),
    ...("stages" in result ? { pipeline: stageRows(run, result as PipelineResult) } : {}),
  });
  if (evalMetrics) run.report({ type: "eval", step: result.round + 1, metrics: evalMetrics });
}
