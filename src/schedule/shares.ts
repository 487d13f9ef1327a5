/**
 * Split `total` samples among workers in proportion to `weights`: integers that sum exactly
 * to `total` (largest remainders go first; ties to the lower rank, so the split is stable).
 */
export function proportionalShares(total: number, weights: number[]): number[] {
  if (weights.length === 0) throw new Error("no workers to share among");
  const sum = weights.reduce((a, b) => a + b, 0);
  if (!(sum > 0)) throw new Error("weights must sum to a positive number");
  const exact = weights.map((w) => (total * w) / sum);
  const shares = exact.map(Math.floor);
  let left = total - shares.reduce((a, b) => a + b, 0);
  const order = exact.map((x, i) => ({ i, frac: x - Math.floor(x) })).sort((a, b) => b.frac - a.frac || a.i - b.i);
  for (const { i } of order) {
    if (left <= 0) break;
    shares[i] += 1;
    left -= 1;
  }
  return shares;
}

/** Equal shares: every worker gets total/N, the first total%N get one more. */
export function equalShares(total: number, workers: number): number[] {
  return proportionalShares(total, new Array(workers).fill(1));
}

/** Contiguous [start, count) slices of `total` items following `shares`' proportions. */
export function slicesFor(total: number, weights: number[]): { start: number; count: number }[] {
  const counts = proportionalShares(total, weights);
  let start = 0;
  return counts.map((count) => {
    const slice = { start, count };
    start += count;
    return slice;
  });
}
