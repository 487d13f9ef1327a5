import { proportionalShares } from "./shares.js";

export interface WorkerCapability {
  id: string; // for messages
  samplesPerS: number; // measured throughput on this task (or a device estimate)
  /**
   * Largest micro-batch that fits. Not a cap on the share: a larger share is run as accumulated
   * micro-batches at about the same cost per sample, so it does not change the split.
   */
  maxMicroBatch?: number;
  linkBytesPerS?: number; // measured bandwidth to its ring neighbour (undefined = unknown/fast)
}

export interface AllocationInput {
  batchSize: number;
  workers: WorkerCapability[];
  stepBytesPerWorker: number; // bytes each ring member sends per step
}

export interface Allocation {
  shares: number[]; // per input worker, integers summing exactly to batchSize; 0 for excluded
  excluded: { index: number; id: string; reason: string }[]; // with the figures behind it
  predictedStepS: number; // max over included of (share / samplesPerS) + ring time
}

/** Leaving workers out must make steps at least this much faster, so near-ties keep everyone. */
const MIN_SPEEDUP = 1.05;

interface Prediction {
  shares: number[]; // full length, 0 outside the set
  computeS: number;
  ringS: number;
  stepS: number;
}

/**
 * Split `batchSize` among workers in proportion to throughput, leaving out those whose presence
 * makes steps slower: a slow link (in a ring every member sends the same bytes, so the slowest
 * link bounds every all-reduce), a worker so slow that its rounded share dominates compute, or
 * one whose share rounds to 0.
 */
export function allocate(input: AllocationInput): Allocation {
  const { batchSize, workers, stepBytesPerWorker } = input;
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new Error(`batchSize must be a positive integer, got ${batchSize}`);
  if (workers.length === 0) throw new Error("no workers to allocate to");
  if (!(stepBytesPerWorker >= 0)) throw new Error(`stepBytesPerWorker must be >= 0, got ${stepBytesPerWorker}`);

  const excluded: Allocation["excluded"] = [];
  const exclude = (index: number, reason: string) => {
    excluded.push({ index, id: workers[index].id, reason: `worker ${workers[index].id}: ${reason}` });
    included.delete(index);
  };

  const included = new Set<number>();
  workers.forEach((w, i) => {
    if (Number.isFinite(w.samplesPerS) && w.samplesPerS > 0) included.add(i);
  });
  if (included.size === 0) throw new Error("no worker has a positive samplesPerS");
  workers.forEach((w, i) => {
    if (!included.has(i)) excluded.push({ index: i, id: w.id, reason: `worker ${w.id}: no usable throughput (samplesPerS = ${w.samplesPerS})` });
  });

  const predict = (set: Set<number>): Prediction => {
    const idx = [...set].sort((a, b) => a - b);
    const part = proportionalShares(batchSize, idx.map((i) => workers[i].samplesPerS));
    const shares = new Array<number>(workers.length).fill(0);
    idx.forEach((i, k) => (shares[i] = part[k]));
    const computeS = Math.max(...idx.map((i) => shares[i] / workers[i].samplesPerS));
    // A lone worker has no ring; unknown links count as fast.
    const links = idx.map((i) => workers[i].linkBytesPerS).filter((l): l is number => l !== undefined);
    const ringS = idx.length > 1 && links.length > 0 && stepBytesPerWorker > 0 ? stepBytesPerWorker / Math.min(...links) : 0;
    return { shares, computeS, ringS, stepS: computeS + ringS };
  };

  for (;;) {
    const cur = predict(included);

    // A share that rounds to 0 contributes nothing but would still hold up the ring.
    const zero = [...included].filter((i) => cur.shares[i] === 0);
    if (zero.length > 0 && zero.length < included.size) {
      const totalRate = [...included].reduce((a, i) => a + workers[i].samplesPerS, 0);
      for (const i of zero) {
        const exact = (batchSize * workers[i].samplesPerS) / totalRate;
        exclude(i, `at ${fmt(workers[i].samplesPerS)} samples/s against ${fmt(totalRate)} in all, its share of ${batchSize} would be ${exact.toPrecision(2)} samples, which rounds to 0`);
      }
      continue;
    }
    if (included.size <= 1) break;

    // Candidates: the slowest worker alone, and the k slowest links together (k = 1..n-1);
    // taking a prefix handles ties and near-ties, where dropping only one slow link gains nothing.
    // Link candidates first: when leaving out the slowest worker and leaving out the slowest
    // link are the same move, the link is what the message should name (ties keep the first).
    const candidates: { group: number[]; byLink: boolean }[] = [];
    const byLink = [...included]
      .filter((i) => workers[i].linkBytesPerS !== undefined)
      .sort((a, b) => workers[a].linkBytesPerS! - workers[b].linkBytesPerS! || a - b);
    for (let k = 1; k <= Math.min(byLink.length, included.size - 1); k++) candidates.push({ group: byLink.slice(0, k), byLink: true });
    const bySpeed = [...included].sort((a, b) => workers[a].samplesPerS - workers[b].samplesPerS || a - b);
    candidates.push({ group: [bySpeed[0]], byLink: false });

    let best: { group: number[]; p: Prediction; byLink: boolean } | undefined;
    for (const { group, byLink: viaLink } of candidates) {
      const p = predict(new Set([...included].filter((i) => !group.includes(i))));
      if (!best || p.stepS < best.p.stepS) best = { group, p, byLink: viaLink };
    }
    // batchSize is fixed, so step time per sample compares as step time.
    if (!best || !(best.p.stepS * MIN_SPEEDUP < cur.stepS)) break; // also stops on Infinity vs Infinity

    const speedup = `${(cur.stepS / best.p.stepS).toFixed(1)}x`;
    const { group } = best;
    // Name what the move saves most of: ring time (a slow link) or compute (a slow worker).
    const viaLink = best.byLink && (group.length > 1 || cur.ringS - best.p.ringS >= cur.computeS - best.p.computeS);
    for (const i of group) {
      const w = workers[i];
      const others = group.filter((j) => j !== i).map((j) => workers[j].id);
      const together = others.length > 0 ? ` (left out together with ${others.join(", ")})` : "";
      if (viaLink) {
        const ringS = stepBytesPerWorker / w.linkBytesPerS!;
        exclude(i, `its link (${fmtBytes(w.linkBytesPerS!)}) would make every step's all-reduce take ${ringS.toFixed(2)} s against ${cur.computeS.toFixed(2)} s of compute; leaving it out makes steps ${speedup} faster${together}`);
      } else {
        const ownS = cur.shares[i] / w.samplesPerS;
        const restS = Math.max(0, ...[...included].filter((j) => j !== i).map((j) => cur.shares[j] / workers[j].samplesPerS));
        exclude(i, `at ${fmt(w.samplesPerS)} samples/s its share of ${cur.shares[i]} sample${cur.shares[i] === 1 ? "" : "s"} takes ${ownS.toFixed(2)} s against ${restS.toFixed(2)} s for the others; leaving it out makes steps ${speedup} faster`);
      }
    }
  }

  const final = predict(included);
  excluded.sort((a, b) => a.index - b.index);
  return { shares: final.shares, excluded, predictedStepS: final.stepS };
}

function fmt(x: number): string {
  return x.toFixed(1);
}

function fmtBytes(bytesPerS: number): string {
  if (bytesPerS >= 1e9) return `${(bytesPerS / 1e9).toFixed(1)} GB/s`;
  if (bytesPerS >= 1e6) return `${(bytesPerS / 1e6).toFixed(1)} MB/s`;
  return `${(bytesPerS / 1e3).toFixed(1)} kB/s`;
}
