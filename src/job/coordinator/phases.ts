import path from "node:path";
import { UserError } from "../../errors.js";
import { slicesFor } from "../../schedule/shares.js";
import type { TaskPackage } from "../package.js";
import { RunDir, type Checkpoint } from "../runDir.js";
import { JobFailed } from "./errors.js";
import type { MessageOf } from "./exchanges.js";
import { sendOrder } from "./orders.js";
import { checkStateFiles } from "./stateFiles.js";
import { PipelineStrategy } from "../../strategy/pipeline.js";
import { pipelineCheckpointFiles, pipelineEvalOrder, pipelineFinalWeights, pipelineRestore } from "./pipelinePhases.js";
import { type Run, READY_TIMEOUT_MS, RECOVERY_TIMEOUT_MS, RING_TIMEOUT_MS, STEP_TIMEOUT_MS } from "./run.js";

/** Bytes each host uploads to its ring successor to measure the link. */
const LINK_PROBE_BYTES = 4 * 1024 * 1024;
const LINK_PROBE_TIMEOUT_MS = 180_000;

/** The run directory: a new one, or the one to resume with its newest intact checkpoint. */
export async function openRunDir(run: Pick<Run, "config" | "tally" | "status" | "report">, loaded: { path: string; taskPath: string; text: string }, resume?: string, pkg: TaskPackage | null = null): Promise<{ dir: RunDir; checkpoint: Checkpoint | null }> {
  if (!resume) {
    const dir = await RunDir.create(path.resolve(run.config.output), run.config.name);
    await dir.copyInputs(loaded.text, loaded.taskPath, pkg);
    run.report({ type: "run", run_dir: dir.dir, resumed: false });
    return { dir, checkpoint: null };
  }
  const { checkpoint, skipped } = await RunDir.latestCheckpoint(resume);
  for (const why of skipped) run.status(`Passing over checkpoint ${why}`, "warn");
  if (!checkpoint) {
    throw new UserError(
      `${resume} has no intact checkpoint to resume from${skipped.length ? ` (${skipped.join("; ")})` : ""}`,
      "Checkpoints are written every `checkpoint.every` steps; a run without one starts again with `nimble train CONFIG`.",
      2,
    );
  }
  const { run: dir, kept, damaged } = await RunDir.reopen(resume, checkpoint.step);
  if (damaged.length > 0) run.status(`metrics.jsonl line${damaged.length === 1 ? "" : "s"} ${damaged.slice(0, 10).join(", ")} ${damaged.length === 1 ? "is" : "are"} damaged: dropped from the resumed run`, "warn");
  // The run's figures continue from the checkpoint: the steps after it are run again.
  run.tally.recordKept(checkpoint.step, kept);
  run.report({ type: "run", run_dir: dir.dir, resumed: true });
  run.status(`Resuming ${resume} from step ${checkpoint.step} (${path.basename(checkpoint.dir)})`);
  return { dir, checkpoint };
}

/** Start every worker; resolves with rank 0's description of the model and data. */
export async function startWorkers(run: Run): Promise<MessageOf<"ready">["info"]> {
  const { providers } = run;
  const members = run.membership.active;
  const ready = run.exchanges.expect("ready", "worker start", members, READY_TIMEOUT_MS);
  // Loaded, and linked into the first ring (which forms while the workers load).
  const linked = run.exchanges.expect("ring_ready", "the first ring", members, READY_TIMEOUT_MS + RING_TIMEOUT_MS, (m) => m.epoch === 0);
  run.status(`Starting ${providers.ranks.length} worker${providers.ranks.length === 1 ? "" : "s"}; run directory ${run.dir.dir}`);
  await providers.startJob();
  const readies = await ready;
  run.tally.startup.mark("workers");
  run.tally.startup.workers([...readies].flatMap(([rank, m]) => (m.startup ? [{ rank, ...m.startup }] : [])));
  const info = readies.get(0)!.info;
  await linked;
  run.tally.startup.mark("ring");
  // Under pipeline a worker holds its stage only: the whole model is the profile's.
  const plan = run.tally.pipeline?.plan as { model?: string } | undefined;
  const model = plan?.model ? `${plan.model} in ${run.config.parallel!.pipeline_stages} stages` : info.model;
  run.status(`Workers ready: ${model}; ${info.train_size} training and ${info.val_size} validation samples`);
  return info;
}

/** Resuming: every rank loads the checkpoint (its own compressor memories where saved). */
export async function restore(run: Run, checkpoint: Checkpoint, configText?: string): Promise<void> {
  if (run.strategy instanceof PipelineStrategy) {
    await pipelineRestore(run, run.strategy, checkpoint);
    await run.dir.settleResume(configText);
    for (const r of run.providers.ranks) r.row.state = "training";
    return;
  }
  const shared = checkpoint.files.filter((f) => !/^compressor-rank-\d+\.pt$/.test(f.name));
  const loaded = run.exchanges.expect("loaded", "checkpoint loading", run.membership.active, STEP_TIMEOUT_MS);
  for (const r of run.providers.ranks) {
    const own = checkpoint.files.find((f) => f.name === `compressor-rank-${r.rank}.pt`);
    const files = own ? [...shared.filter((f) => f.name !== "compressor.pt"), { name: "compressor.pt", data: own.data }] : shared;
    sendOrder(run.providers, [r.rank], { op: "load_state", files: files.map((f) => ({ name: f.name, size: f.data.byteLength })) }, Buffer.concat(files.map((f) => f.data)));
  }
  for (const [rank, m] of await loaded) {
    if (m.step !== checkpoint.step) throw new JobFailed(`Rank ${rank} loaded step ${m.step} from a checkpoint of step ${checkpoint.step}`);
  }
  // Every worker holds the checkpoint: only now does the run directory change.
  await run.dir.settleResume(configText);
  for (const r of run.providers.ranks) r.row.state = "training";
}

/** Every replica starts from rank 0's weights; the broadcast's bytes count apart. */
export async function syncWeights(run: Run): Promise<void> {
  const members = run.membership.active;
  const synced = run.exchanges.expect("synced", "initial weight sync", members, STEP_TIMEOUT_MS);
  sendOrder(run.providers, members, { op: "sync", source: 0 });
  const reports = await synced;
  checkHashes(members, reports, "after the initial weight sync");
  run.tally.recordSync([...reports.values()].reduce((sum, m) => sum + m.bytes_sent, 0));
  for (const r of run.providers.ranks) r.row.state = "training";
}

/** Leaving out slow workers weighs each one's link: measure each host's upload to the next. */
export async function probeLinks(run: Run): Promise<void> {
  const members = run.membership.active;
  const probed = run.exchanges.expect("link", "link measurements", members, LINK_PROBE_TIMEOUT_MS);
  for (const c of run.providers.clientsOf(members)) c.send({ t: "probe_links", bytes: LINK_PROBE_BYTES });
  run.tally.recordLinks([...(await probed)].map(([rank, m]) => ({ rank, to: m.to, rtt_ms: m.rtt_ms, upload_bytes_per_s: m.upload_bytes_per_s })));
  const between = run.tally.links.filter((l) => l.upload_bytes_per_s !== null);
  if (between.length > 0) {
    run.status(`Links: ${between.map((l) => `rank ${l.rank} -> ${l.to} ${formatRate(l.upload_bytes_per_s!)}, rtt ${l.rtt_ms!.toFixed(1)} ms`).join("; ")}`);
  }
}

function formatRate(bytesPerS: number): string {
  if (bytesPerS >= 1e9) return `${(bytesPerS / 1e9).toFixed(2)} GB/s`;
  if (bytesPerS >= 1e6) return `${(bytesPerS / 1e6).toFixed(1)} MB/s`;
  return `${(bytesPerS / 1e3).toFixed(0)} kB/s`;
}

/** Validation metrics after `step`, each member evaluating a slice of the first `samples` items. */
export async function evaluate(run: Run, step: number, samples: number): Promise<Record<string, number>> {
  const members = run.membership.active;
  if (run.strategy instanceof PipelineStrategy) {
    const done = run.exchanges.expect("eval_done", `evaluation after step ${step + 1}`, members, STEP_TIMEOUT_MS, (m) => m.step === step);
    sendOrder(run.providers, members, { ...pipelineEvalOrder(run.strategy, step, samples, run.config.eval.batch_size), ...run.commits.ride() });
    return foldMetrics([...(await done).values()]);
  }
  const slices = slicesFor(samples, members.map(() => 1));
  const done = run.exchanges.expect("eval_done", `evaluation after step ${step + 1}`, members, STEP_TIMEOUT_MS, (m) => m.step === step);
  const decision = run.commits.ride();
  members.forEach((rank, k) => sendOrder(run.providers, [rank], { op: "eval", step, ...slices[k], batch_size: run.config.eval.batch_size, ...decision }));
  return foldMetrics([...(await done).values()]);
}

/**
 * Each metric is its sums over its counts, across every member's slice: a task's (sums, counts)
 * pairs (tokens, positives) stay exact, and plain batch means are weighted by items.
 */
export function foldMetrics(reports: { count: number; sums: Record<string, number>; counts?: Record<string, number> }[]): Record<string, number> {
  const sums: Record<string, number> = {};
  const counts: Record<string, number> = {};
  for (const rep of reports) {
    for (const [k, v] of Object.entries(rep.sums)) {
      sums[k] = (sums[k] ?? 0) + v;
      counts[k] = (counts[k] ?? 0) + (rep.counts?.[k] ?? rep.count);
    }
  }
  return Object.fromEntries(Object.entries(sums).filter(([k]) => counts[k] > 0).map(([k, v]) => [k, v / counts[k]]));
}

/**
 * A checkpoint after `step`: one rank's model, optimizer, schedule, data position and RNG
 * (the same on every replica), and every rank's compressor state (error-feedback memories
 * are per worker).
 */
export async function checkpointFiles(run: Run, step: number): Promise<{ name: string; data: Uint8Array }[]> {
  if (run.strategy instanceof PipelineStrategy) return pipelineCheckpointFiles(run, run.strategy, step, run.pipelineBounds ?? null);
  const members = run.membership.active;
  const source = members[0];
  const state = run.exchanges.expect("state", `checkpoint at step ${step + 1}`, members, STEP_TIMEOUT_MS, (m) => m.kind === (m.rank === source ? "checkpoint" : "compressor"));
  const decision = run.commits.ride();
  sendOrder(run.providers, [source], { op: "state", kind: "checkpoint", ...decision });
  const others = members.filter((rank) => rank !== source);
  if (others.length > 0) sendOrder(run.providers, others, { op: "state", kind: "compressor", ...decision });
  const got = await state;
  for (const [rank, m] of got) checkStateFiles(m.kind, m.files, `rank ${rank} (${run.providers.ranks[rank].client.address})`);
  const out = got.get(source)!.files.filter((f) => f.name !== "compressor.pt");
  for (const rank of members) {
    const own = got.get(rank)!.files.find((f) => f.name === "compressor.pt");
    if (own) out.push({ name: `compressor-rank-${rank}.pt`, data: own.data });
  }
  // A single compressor.pt too, for tools that read one (it is the first rank's).
  const first = got.get(source)!.files.find((f) => f.name === "compressor.pt");
  if (first) out.push(first);
  return out;
}

/**
 * The explicit flush: every member applies the last decision (again, when it already rode
 * on orders: then it is a no-op) and reports its hash, which must agree after a commit.
 * Before recovery and at the end of the job.
 */
export async function flushDecision(
  run: Run,
  what: string,
  when: string,
  timeoutMs = RECOVERY_TIMEOUT_MS,
  members: readonly number[] = run.membership.active,
): Promise<void> {
  const decision = run.commits.flush();
  if (!decision) return;
  const acks = run.exchanges.expect("decided", what, members, timeoutMs, (m) => m.step === decision.step);
  sendOrder(run.providers, members, { op: "decide", ...decision });
  const got = await acks;
  if (decision.verdict === "commit") checkHashes(members, got, when, (r) => run.strategy.hashGroup(r));
}

/** The final weights, once every replica applied the last step and the hashes agree. */
export async function finalWeights(run: Run): Promise<{ name: string; data: Uint8Array }[]> {
  await flushDecision(run, "the last step's update", "after the last step", STEP_TIMEOUT_MS);
  if (run.strategy instanceof PipelineStrategy) return pipelineFinalWeights(run, run.strategy);
  const source = run.membership.active[0];
  const final = run.exchanges.expect("state", "final weights", [source], STEP_TIMEOUT_MS, (m) => m.kind === "final");
  sendOrder(run.providers, [source], { op: "state", kind: "final" });
  const files = (await final).get(source)!.files;
  checkStateFiles("final", files, `rank ${source} (${run.providers.ranks[source].client.address})`);
  return files;
}

/** Replicas' hashes agree; `groupOf` says which ranks hold the same parameters (a pipeline's stages differ). */
export function checkHashes(members: readonly number[], reports: ReadonlyMap<number, { hash?: string }>, when: string, groupOf: (rank: number) => number = () => 0): void {
  const groups = new Map<number, number[]>();
  for (const r of members) groups.set(groupOf(r), [...(groups.get(groupOf(r)) ?? []), r]);
  for (const [group, ranks] of groups) {
    const hashes = ranks.map((r) => reports.get(r)?.hash);
    const first = hashes[0];
    if (!first || hashes.some((h) => h !== first)) {
      const list = ranks.map((r, k) => `rank ${r} ${hashes[k]?.slice(0, 12) ?? "(none)"}`).join(", ");
      const what = groups.size > 1 ? `Replicas of stage ${group} diverged` : "Replicas diverged";
      throw new JobFailed(`${what} ${when}: parameter hashes ${list}`, "This is a bug in nimble or a nondeterministic task; please report it with the run directory.");
    }
  }
}
