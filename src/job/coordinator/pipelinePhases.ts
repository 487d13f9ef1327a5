import { checkPipelineWorkers } from "../../config/parallelRules.js";
import { configErrorAt, type LoadedConfig } from "../../config/load.js";
import { ConfigError, UserError } from "../../errors.js";
import type { PipelineSpec } from "../../protocol/messages.js";
import { runLayerProfile, type LayerProfile } from "../../runtime/layerProfile.js";
import { localRequirements } from "../../runtime/requirements.js";
import { mergeSafetensors } from "../../runs/safetensors.js";
import { describePlan, optimizerStateFactor, PlanError, planStages, type StagePlanInput, type StageWorker } from "../../schedule/stages.js";
import { pipelineGroups, routeChains, type PipelineLayout, type PipelineStrategy } from "../../strategy/pipeline.js";
import { RunDir, type Checkpoint } from "../runDir.js";
import { JobFailed } from "./errors.js";
import { sendOrder } from "./orders.js";
import { checkStateFiles } from "./stateFiles.js";
import { type Run, STEP_TIMEOUT_MS } from "./run.js";

/** The checkpoint file that records the pipeline's layout, so a resumed run keeps it. */
export const PIPELINE_FILE = "pipeline.json";

export interface SavedLayout extends PipelineLayout {
  bounds: number[] | null;
}

/** A stage's file in a checkpoint: its own name, prefixed (`stage1-model.pt`). */
export const stageFile = (stage: number, name: string) => `stage${stage}-${name}`;

/** One holder of each stage (the one serving the lowest chain), by stage. */
function sources(strategy: PipelineStrategy): number[] {
  const routes = strategy.routes;
  return Array.from({ length: strategy.layout.stages }, (_, s) => routes[0][s]);
}

/** Validation metrics under pipeline: every member evaluates, the chains share the items, last stages report. */
export function pipelineEvalOrder(strategy: PipelineStrategy, step: number, samples: number, batchSize: number) {
  return { op: "eval" as const, step, start: 0, count: samples, batch_size: batchSize, chains: strategy.routes };
}

/**
 * A checkpoint of a pipeline: each stage's files from one of its holders (prefixed by its
 * stage), every rank's compressor state, and the layout (pipeline.json) that resuming keeps.
 */
export async function pipelineCheckpointFiles(run: Run, strategy: PipelineStrategy, step: number, bounds: number[] | null): Promise<{ name: string; data: Uint8Array }[]> {
  const members = run.membership.active;
  const from = sources(strategy);
  const isSource = (rank: number) => from.includes(rank);
  const state = run.exchanges.expect("state", `checkpoint at step ${step + 1}`, members, STEP_TIMEOUT_MS, (m) => m.kind === (isSource(m.rank) ? "checkpoint" : "compressor"));
  const decision = run.commits.ride();
  sendOrder(run.providers, from, { op: "state", kind: "checkpoint", ...decision });
  const others = members.filter((rank) => !isSource(rank));
  if (others.length > 0) sendOrder(run.providers, others, { op: "state", kind: "compressor", ...decision });
  const got = await state;
  for (const [rank, m] of got) checkStateFiles(m.kind, m.files, `rank ${rank} (${run.providers.ranks[rank].client.address})`);
  const out: { name: string; data: Uint8Array }[] = [];
  from.forEach((rank, s) => {
    for (const f of got.get(rank)!.files) if (f.name !== "compressor.pt") out.push({ name: stageFile(s, f.name), data: f.data });
  });
  for (const rank of members) {
    const own = got.get(rank)!.files.find((f) => f.name === "compressor.pt");
    if (own) out.push({ name: `compressor-rank-${rank}.pt`, data: own.data });
  }
  const layout: SavedLayout = { ...strategy.layout, bounds };
  out.push({ name: PIPELINE_FILE, data: Buffer.from(JSON.stringify(layout)) });
  await mirrorSoleHolders(run, strategy, step + 1);
  return out;
}

/**
 * Each stage held by one worker alone sends its whole state to a pipe neighbour's
 * provider, which keeps it (provider to provider, not through this machine): should that
 * worker or its provider be lost, its replacement starts from there.
 */
async function mirrorSoleHolders(run: Run, strategy: PipelineStrategy, step: number): Promise<void> {
  const targets = strategy.mirrorTargets();
  if (targets.length === 0) return;
  const tagOf = (stage: number) => `m:${step}:${stage}`;
  const what = `stage states reaching their keepers at step ${step}`;
  const kept = run.exchanges.expect("mirror_kept", what, targets.map((t) => t.keeper), STEP_TIMEOUT_MS, (m) => targets.some((t) => t.keeper === m.rank && m.tag === tagOf(t.stage)));
  const sent = run.exchanges.expect("mirrored", what, targets.map((t) => t.holder), STEP_TIMEOUT_MS);
  for (const t of targets) run.providers.ranks[t.keeper].client.send({ t: "mirror_take", rank: t.keeper, from: t.holder, stage: t.stage, tag: tagOf(t.stage) });
  for (const t of targets) sendOrder(run.providers, [t.holder], { op: "mirror", to: t.keeper, tag: tagOf(t.stage) });
  const [got] = await Promise.all([kept, sent]);
  for (const t of targets) strategy.mirrors.set(t.stage, { keeper: t.keeper, tag: tagOf(t.stage), step });
  const bytes = [...got.values()].reduce((a, m) => a + m.bytes, 0);
  run.status(`Mirrored ${targets.map((t) => `stage ${t.stage} (rank ${t.holder} -> rank ${t.keeper})`).join(", ")}: ${(bytes / 1e6).toFixed(1)} MB kept by providers`, "debug");
}

/**
 * A stage lost with its only holder, and its replacement ready (a restarted worker, a
 * provider back): the replacement loads the state its keeper mirrored at the last
 * checkpoint, every other member loads that checkpoint's state of its own stage, and the
 * run goes back to that step. Returns the step training continues from.
 */
export async function replaceFromMirror(run: Run, strategy: PipelineStrategy, members: readonly number[], replacing: { stage: number; rank: number }[]): Promise<number> {
  const mirrors = replacing.map((r) => ({ ...r, ...strategy.mirrors.get(r.stage)! }));
  const step = mirrors[0].step;
  if (mirrors.some((m) => m.step !== step)) throw new JobFailed(`The lost stages' mirrors are of different steps (${mirrors.map((m) => m.step).join(", ")})`);
  const { checkpoint } = await RunDir.latestCheckpoint(run.dir.dir);
  if (!checkpoint || checkpoint.step !== step) {
    throw new JobFailed(`Stage ${mirrors[0].stage}'s mirror is of step ${step} but the run's newest checkpoint is ${checkpoint ? `of step ${checkpoint.step}` : "missing"}`, "Continue with `nimble train --resume RUN_DIR`.");
  }
  const others = members.filter((r) => !replacing.some((x) => x.rank === r));
  const loaded = run.exchanges.expect("loaded", `stage states of step ${step} loading`, members, STEP_TIMEOUT_MS);
  for (const m of mirrors) {
    run.providers.ranks[m.keeper].client.send({ t: "mirror_give", rank: m.keeper, to: m.rank, stage: m.stage, tag: m.tag });
    sendOrder(run.providers, [m.rank], { op: "load_mirror", from: m.keeper, tag: m.tag });
  }
  for (const rank of others) {
    const s = strategy.layout.stageOf[rank];
    const prefix = stageFile(s, "");
    const files = checkpoint.files.filter((f) => f.name.startsWith(prefix)).map((f) => ({ name: f.name.slice(prefix.length), data: f.data }));
    sendOrder(run.providers, [rank], { op: "load_state", files: files.map((f) => ({ name: f.name, size: f.data.byteLength })) }, Buffer.concat(files.map((f) => f.data)));
  }
  for (const [rank, m] of await loaded) if (m.step !== step) throw new JobFailed(`Rank ${rank} loaded step ${m.step}, not the mirrored step ${step}`);
  const kept = await run.dir.rollBackTo(step);
  run.tally.rollBack(step, kept);
  run.status(`Stage${mirrors.length === 1 ? "" : "s"} ${mirrors.map((m) => `${m.stage} (rank ${m.rank}, from rank ${m.keeper}'s provider)`).join(", ")} taken over with the state mirrored at step ${step}; the others back to that step's checkpoint: steps ${step + 1} on run again`, "warn");
  return step;
}

/** The layout a checkpoint was written with (null: not a pipeline checkpoint, or unreadable). */
export function savedLayout(checkpoint: Checkpoint): SavedLayout | null {
  const f = checkpoint.files.find((x) => x.name === PIPELINE_FILE);
  if (!f) return null;
  try {
    const v = JSON.parse(Buffer.from(f.data).toString("utf8")) as SavedLayout;
    const ints = (a: unknown) => Array.isArray(a) && a.every((x) => Number.isInteger(x) && x >= 0);
    if (!Number.isInteger(v.stages) || !ints(v.stageOf) || !Array.isArray(v.chains) || !v.chains.every(ints) || !(v.bounds === null || ints(v.bounds))) return null;
    return v;
  } catch {
    return null;
  }
}

/** Resuming a pipeline: each rank loads its stage's files (and its own compressor state). */
export async function pipelineRestore(run: Run, strategy: PipelineStrategy, checkpoint: Checkpoint): Promise<void> {
  const loaded = run.exchanges.expect("loaded", "checkpoint loading", run.membership.active, STEP_TIMEOUT_MS);
  for (const rank of run.membership.active) {
    const s = strategy.layout.stageOf[rank];
    const prefix = stageFile(s, "");
    const files = checkpoint.files.filter((f) => f.name.startsWith(prefix)).map((f) => ({ name: f.name.slice(prefix.length), data: f.data }));
    if (files.length === 0) throw new JobFailed(`The checkpoint of step ${checkpoint.step} has no files of stage ${s}`);
    const own = checkpoint.files.find((f) => f.name === `compressor-rank-${rank}.pt`);
    if (own) files.push({ name: "compressor.pt", data: own.data });
    sendOrder(run.providers, [rank], { op: "load_state", files: files.map((f) => ({ name: f.name, size: f.data.byteLength })) }, Buffer.concat(files.map((f) => f.data)));
  }
  for (const [rank, m] of await loaded) {
    if (m.step !== checkpoint.step) throw new JobFailed(`Rank ${rank} loaded step ${m.step} from a checkpoint of step ${checkpoint.step}`);
  }
}

/** The final weights: each stage's tensors from one holder, merged under the unsplit model's names. */
export async function pipelineFinalWeights(run: Run, strategy: PipelineStrategy): Promise<{ name: string; data: Uint8Array }[]> {
  const from = sources(strategy);
  const final = run.exchanges.expect("state", "final weights", from, STEP_TIMEOUT_MS, (m) => m.kind === "final");
  sendOrder(run.providers, from, { op: "state", kind: "final" });
  const got = await final;
  const parts = from.map((rank, s) => {
    const files = got.get(rank)!.files;
    const what = `rank ${rank} (${run.providers.ranks[rank].client.address}), stage ${s}`;
    checkStateFiles("final", files, what);
    return { what, bytes: files.find((f) => f.name === "model.safetensors")!.data };
  });
  try {
    return [{ name: "model.safetensors", data: mergeSafetensors(parts) }];
  } catch (err) {
    throw new JobFailed(`The stages' final weights do not merge: ${err instanceof Error ? err.message : String(err)}`);
  }
}

/**
 * What a worker holds beyond the profile's base and its stage: the link, prefetched batches,
 * the allocator's slack (a 2 x 33.6 MB split measured 403-424 MB resident against 409 MB
 * estimated before this margin, here).
 */
const WORKER_MARGIN_BYTES = 64 * 1024 * 1024;

/** What the coordinator decided of the pipeline before the job starts. */
export interface PipelineStart {
  layout: PipelineLayout;
  bounds: number[] | null;
  spec: PipelineSpec;
}

/**
 * The pipeline's layout: a resumed run keeps its checkpoint's; otherwise the task's layers
 * are profiled here (one layer built at a time) and split by the planner, sized to each
 * worker's memory limit and speed. The plan, and why, goes to the console and summary.json.
 */
export async function planPipeline(
  run: Pick<Run, "config" | "providers" | "tally" | "status">,
  loaded: LoadedConfig,
  checkpoint: Checkpoint | null,
  profile: Promise<LayerProfile> | null,
): Promise<PipelineStart> {
  try {
    return await planOrResume(run, loaded, checkpoint, profile);
  } catch (err) {
    // The profile's and the planner's config errors point at the config's line.
    if (err instanceof PlanError) throw configErrorAt(loaded, "parallel.pipeline_stages", err.message.replace(/^parallel\.pipeline_stages: /, ""));
    const field = err instanceof ConfigError ? /^([a-z_]+(?:\.[a-z_0-9]+)*): ([\s\S]*)$/.exec(err.message) : null;
    if (field) throw configErrorAt(loaded, field[1], field[2]);
    throw err;
  }
}

/**
 * The task's layers measured on this machine, one at a time (python -m
 * nimble_worker.pipeline.profile), before any provider is started: a task that cannot be
 * split, or has fewer layers than stages, fails here at once. `workers` is the count the
 * config implies (local_workers, or one per listed provider), for the micro-batch size.
 */
export async function profilePipeline(run: Pick<Run, "config" | "providers" | "status">, loaded: LoadedConfig, workers: number): Promise<LayerProfile> {
  const { config } = run;
  const python = await run.providers.python();
  const replicas = Math.max(1, Math.floor(workers / config.parallel!.pipeline_stages));
  run.status(`Pipeline: profiling the model's layers (one at a time) to plan ${config.parallel!.pipeline_stages} stages`);
  try {
    // A task importing one of its requirements is profiled with them installed here (cached, as for the dry run).
    const siteDirs = config.requirements.length > 0 ? await localRequirements(config.requirements, python.python, (line) => run.status(line, "debug")) : [];
    return await runLayerProfile({ python: python.python, taskPath: loaded.taskPath, config: config as unknown as Record<string, unknown>, replicas, siteDirs });
  } catch (err) {
    const field = err instanceof ConfigError ? /^([a-z_]+(?:\.[a-z_0-9]+)*): ([\s\S]*)$/.exec(err.message) : null;
    if (field) throw configErrorAt(loaded, field[1], field[2]);
    throw err;
  }
}

async function planOrResume(run: Pick<Run, "config" | "providers" | "tally" | "status">, loaded: LoadedConfig, checkpoint: Checkpoint | null, profiled: Promise<LayerProfile> | null): Promise<PipelineStart> {
  const { config, providers } = run;
  const parallel = config.parallel!;
  const ranks = providers.ranks;
  checkPipelineWorkers(config, ranks.length);
  const saved = checkpoint ? savedLayout(checkpoint) : null;
  if (checkpoint && !saved) throw new UserError(`The checkpoint of step ${checkpoint.step} has no readable ${PIPELINE_FILE}: it was not written by a pipeline run`, "Resume it without `parallel`, or start afresh.", 2);
  if (saved) {
    if (saved.stageOf.length !== ranks.length || saved.stages !== parallel.pipeline_stages) {
      throw new UserError(
        `The checkpoint's pipeline has ${saved.stages} stages over ${saved.stageOf.length} workers; this run has ${parallel.pipeline_stages} over ${ranks.length}`,
        "Resume with the same workers and parallel.pipeline_stages.",
        2,
      );
    }
    run.status(`Pipeline: the checkpoint's layout, ${saved.stages} stages of ${saved.chains.length} replica(s)${saved.bounds ? ` (layers ${saved.bounds.join(" | ")})` : ""}`);
    run.tally.recordPipelinePlan(parallel, { resumed: true, bounds: saved.bounds, chains: saved.chains }, ["the layout of the checkpoint resumed"]);
    return { layout: saved, bounds: saved.bounds, spec: specOf(saved, saved.bounds) };
  }
  const profile = await (profiled ?? profilePipeline(run, loaded, ranks.length));
  const plan = planStages(
    pipelinePlanInput(
      config,
      profile,
      ranks.map((r) => {
        const device = r.client.info.devices.find((d) => d.id === r.device);
        const limit = r.client.info.limits?.max_memory_bytes ?? null;
        const gpu = device && device.kind !== "cpu" ? device.memory_bytes ?? null : null;
        const memoryBytes = limit !== null && gpu !== null ? Math.min(limit, gpu) : (limit ?? gpu);
        return { rank: r.rank, memoryBytes, samplesPerS: r.client.info.profile?.matmul_gflops_fp32 || 1 };
      }),
    ),
  );
  const bounds = profile.sequential ? plan.bounds : null;
  for (const line of describePlan(plan)) run.status(`Pipeline: ${line}`);
  for (const line of plan.why) run.status(`  ${line}`, "debug");
  run.tally.recordPipelinePlan(parallel, { ...plan, model: profile.model, micro_batch: profile.micro_batch, sequential: profile.sequential }, plan.why);
  const stageOf = new Array<number>(ranks.length).fill(0);
  for (const s of plan.stages) for (const r of s.ranks) stageOf[r] = s.index;
  const layout: PipelineLayout = { stages: parallel.pipeline_stages, stageOf, chains: plan.chains };
  return { layout, bounds, spec: specOf(layout, bounds) };
}

/** What the planner is given for `config` and this profile, over `workers` (train and bench plan alike). */
export function pipelinePlanInput(config: Run["config"], profile: LayerProfile, workers: StageWorker[]): StagePlanInput {
  const parallel = config.parallel!;
  return {
    layers: profile.layers,
    workers,
    stages: parallel.pipeline_stages,
    microBatches: parallel.micro_batches,
    schedule: parallel.schedule,
    optimizerStateFactor: stateFactor(config),
    baseBytes: profile.base_rss_bytes + WORKER_MARGIN_BYTES,
    // Every run evaluates at least at its end, in batches of eval.batch_size.
    evalBatchRatio: config.eval.batch_size / Math.max(1, profile.micro_batch),
  };
}

/**
 * Bytes a stage holds per parameter byte beyond the parameters and their gradient (the
 * planner adds those two): the optimizer's state, plus one more copy for autograd's
 * temporaries (a micro-batch's weight gradient before it is added to the accumulated one)
 * and the allocator's slack; while a checkpoint is written the parameters and the
 * optimizer state are held once more.
 */
function stateFactor(config: Run["config"]): number {
  const f = optimizerStateFactor(config.optimizer);
  return Math.max(f + 1, config.checkpoint.every > 0 ? 2 * f : 0);
}

function specOf(layout: PipelineLayout, bounds: number[] | null): PipelineSpec {
  const members = layout.stageOf.map((_, r) => r);
  return { stages: layout.stages, bounds, stage_of: [...layout.stageOf], groups: pipelineGroups(layout, members, routeChains(layout, members)) };
}
