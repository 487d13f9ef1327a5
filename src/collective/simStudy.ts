/**
 * One cell of bench-sim's study: every algorithm simulated at (n, bytes) on a network with
 * measured software costs, set against the single-port lower bound and the cost model's
 * choice, and the reason when the best is more than 2x the bound. Pure.
 */
import {
  ALL_REDUCE_ALGORITHMS,
  type AllReduceAlgorithm,
  allReduceLowerBoundS,
  chooseAllReduce,
  type LinkCosts,
  twoLevelGroupSize,
} from "./costModel.js";
import { type Schedule, type SimCosts, simulate } from "./simEngine.js";
import { allReduceSchedule } from "./simSchedules.js";

/** The network: one-way latency and uplink seconds per byte. */
export interface Network {
  alphaS: number;
  betaSPerByte: number;
}

/**
 * What a member's CPU costs per message and per byte, as measured (SimCosts less the
 * network), and a fixed cost per op (setting it up and settling it) added to every algorithm.
 */
export type SoftwareCosts = Omit<SimCosts, "alphaS" | "betaSPerByte"> & { opS?: number };

export const NO_SOFTWARE_COSTS: SoftwareCosts = { sendMessageS: 0, recvMessageS: 0, sendSPerByte: 0, recvSPerByte: 0 };

/** The cost model's link for a network and software costs: the CPU paces bytes when slower than the uplink. */
export function modelLink(net: Network, sw: SoftwareCosts): LinkCosts {
  return {
    alphaS: net.alphaS,
    betaSPerByte: Math.max(net.betaSPerByte, sw.sendSPerByte + sw.recvSPerByte),
    hopS: sw.sendMessageS + sw.recvMessageS,
  };
}

export type MissReason = "per-byte CPU" | "per-message CPU" | "latency" | "bandwidth";

export interface Cell {
  n: number;
  bytes: number;
  /** simulated seconds per algorithm */
  simS: Record<AllReduceAlgorithm, number>;
  boundS: number;
  best: AllReduceAlgorithm;
  /** best simulated / bound */
  ratio: number;
  /** the cost model's pick, and its simulated time over the best's */
  modelChoice: AllReduceAlgorithm;
  regret: number;
  /** two_level's group size */
  groupSize: number;
  /** why the best misses 2x of the bound (null when it does not) */
  miss: MissReason | null;
  /** best / bound with every software cost at zero (only computed for a miss) */
  ratioWithoutSoftware: number | null;
}

/** Schedules are the expensive part at large n: build each once per (algorithm, n, bytes, group). */
export type ScheduleOf = (algorithm: AllReduceAlgorithm, n: number, bytes: number, groupSize?: number) => Schedule;

export const buildSchedule: ScheduleOf = (a, n, bytes, groupSize) => allReduceSchedule(a, n, bytes, { groupSize });

function bestOf(simS: Record<AllReduceAlgorithm, number>): AllReduceAlgorithm {
  return ALL_REDUCE_ALGORITHMS.reduce((b, a) => (simS[a] < simS[b] ? a : b));
}

function simulateAll(n: number, bytes: number, net: Network, sw: SoftwareCosts, groupSize: number, scheduleOf: ScheduleOf) {
  const { opS = 0, ...cpu } = sw;
  const costs: SimCosts = { ...net, ...cpu };
  const simS = {} as Record<AllReduceAlgorithm, number>;
  for (const a of ALL_REDUCE_ALGORITHMS) simS[a] = opS + simulate(scheduleOf(a, n, bytes, a === "two_level" ? groupSize : undefined), costs).seconds;
  return simS;
}

/**
 * Why a best time is over 2x the bound, from the same cell re-simulated with only the
 * per-byte software costs, and with none: per-message CPU (per message and per op) when the
 * per-byte costs alone stay within 2x, per-byte CPU when the bare network does; otherwise
 * latency when the bound is mostly its latency term, else bandwidth.
 */
export function missReason(perByteOnlyRatio: number, withoutSoftwareRatio: number, net: Network, n: number, bytes: number): MissReason {
  if (perByteOnlyRatio <= 2) return "per-message CPU";
  if (withoutSoftwareRatio <= 2) return "per-byte CPU";
  const latency = net.alphaS * Math.ceil(Math.log2(n));
  return latency >= allReduceLowerBoundS(n, bytes, { ...net }) / 2 ? "latency" : "bandwidth";
}

export function studyCell(n: number, bytes: number, net: Network, sw: SoftwareCosts, scheduleOf: ScheduleOf = buildSchedule): Cell {
  const link = modelLink(net, sw);
  const groupSize = twoLevelGroupSize(n, bytes, link);
  const simS = simulateAll(n, bytes, net, sw, groupSize, scheduleOf);
  const boundS = allReduceLowerBoundS(n, bytes, { alphaS: net.alphaS, betaSPerByte: net.betaSPerByte });
  const best = bestOf(simS);
  const ratio = boundS > 0 ? simS[best] / boundS : 1;
  const modelChoice = chooseAllReduce(n, bytes, link, ALL_REDUCE_ALGORITHMS).algorithm;
  let miss: MissReason | null = null;
  let ratioWithoutSoftware: number | null = null;
  if (ratio > 2) {
    // Every algorithm again without software costs (what the network allows), and with the
    // per-byte costs alone (which of the software costs it is).
    const bare = simulateAll(n, bytes, net, NO_SOFTWARE_COSTS, groupSize, scheduleOf);
    const perByte = simulateAll(n, bytes, net, { ...NO_SOFTWARE_COSTS, sendSPerByte: sw.sendSPerByte, recvSPerByte: sw.recvSPerByte }, groupSize, scheduleOf);
    ratioWithoutSoftware = bare[bestOf(bare)] / boundS;
    miss = missReason(perByte[bestOf(perByte)] / boundS, ratioWithoutSoftware, net, n, bytes);
  }
  return { n, bytes, simS, boundS, best, ratio, modelChoice, regret: simS[modelChoice] / simS[best], groupSize, miss, ratioWithoutSoftware };
}
