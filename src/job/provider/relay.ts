import type { DirectAllReduce } from "../../collective/direct.js";
import type { PipeChannel } from "../../collective/pipe.js";
import type { RingAllReduce, WireCodec } from "../../collective/ring.js";
import { wirePayloadBytes } from "../../protocol/frames.js";
import { errorMessage } from "../../errors.js";
import { REPORT_PART_BYTES, type ToCoordinator, type ToProvider } from "../../protocol/messages.js";
import { isRoundOrder, parseOrder, type FromWorker, type ToWorker } from "../../protocol/workerOps.js";
import type { LocalRank } from "./rank.js";

type OrderMessage = Extract<ToProvider, { t: "order" }>;

/** What the relay needs of its job: the ranks, the ring, and where reports and faults go. */
export interface RelayHost {
  rank(rank: number): LocalRank | undefined;
  /** In the current ring and loaded. */
  inRing(rank: number): boolean;
  ringOf(rank: number): RingAllReduce | null;
  /** The rank's direct all-reduce, when its links to every member are up (null: none). */
  directOf(rank: number): DirectAllReduce | null;
  /** Pipeline: the ring of the rank's stage replicas; `lone` when it holds its stage alone (collectives of one). */
  stageRingOf(rank: number): RingAllReduce | "lone" | null;
  /** Pipeline: the pipe between the rank and `peer` (a neighbouring stage's worker). */
  pipeOf(rank: number, peer: number): PipeChannel | null;
  /** Every local member's round attempt ends (an abort decision): collectives in flight are dropped. */
  abortAttempts(step: number): void;
  send(message: ToCoordinator): void;
  /** A report whose payload goes in `report_part`s, each once the link took the one before (resolves when all are out). */
  sendInParts(report: Extract<ToCoordinator, { t: "report" }>, payload: Uint8Array): Promise<void>;
  loaded(local: LocalRank, m: Extract<FromWorker, { op: "ready" }>): void;
  workerError(local: LocalRank, m: Extract<FromWorker, { op: "error" }>): void;
  /** The rank's ring broke during a collective. */
  ringLost(local: LocalRank, reason: string): void;
  /** A report passed on (for the owner's figures). */
  observe(rank: number, report: Record<string, unknown>): void;
  fail(message: string, kind: "internal", rank?: number): void;
}

/** A collective of `attempt` is served: an attempt ordered and not ended by an abort (orders ahead: the current one or the next). */
function live(local: LocalRank, attempt: number): boolean {
  return attempt >= local.liveFrom && attempt <= local.attempt;
}

/**
 * Carries orders from the coordinator to the workers and reports back, validated against
 * the worker-link schema (src/protocol/workerOps.ts) and otherwise unread: it acts only on
 * attempts (a round order starts one, an abort decision ends it), lifecycle messages
 * (`ready`, `error`) and collectives, which it runs on the ring. A new strategy's
 * operations pass through it unchanged.
 */
export class Relay {
  constructor(private readonly host: RelayHost) {}

  /** An `order` envelope from the coordinator. */
  order(message: OrderMessage): void {
    const payload = message.payload ?? new Uint8Array(0);
    let order: ToWorker;
    try {
      order = parseOrder(message.order, payload.byteLength, "the coordinator");
    } catch (err) {
      return this.host.fail(errorMessage(err), "internal");
    }
    if (order.op === "decide" && order.verdict === "abort") this.host.abortAttempts(order.step);
    const round = isRoundOrder(order.op);
    for (const rank of message.ranks) {
      const local = this.host.rank(rank);
      if (!local) return this.host.fail(`an order for rank ${rank}, which this provider does not host`, "internal");
      // A rank out of the ring (restarting, left out) takes no orders; its rejoin brings it back.
      if (!this.host.inRing(rank)) continue;
      if (round && local.state !== "in_ring" && local.state !== "stepping") {
        return this.host.fail(`a ${order.op} order for rank ${rank} before its ring formed`, "internal", rank);
      }
      let header: ToWorker = order;
      if (round) {
        local.attempt += 1;
        local.collective.set(local.attempt, message.collective ?? null);
        for (const a of local.collective.keys()) if (a < local.attempt - 1) local.collective.delete(a); // at most two rounds are live
        header = { ...order, attempt: local.attempt } as ToWorker;
        local.on("round");
      } else if (order.op === "decide" && order.verdict === "abort") {
        header = { ...order, attempt: local.liveFrom }; // rounds ordered ahead before it end with it
      }
      local.worker?.send(header, payload.byteLength > 0 ? payload : undefined);
    }
  }

  /** A message from a local worker, already validated. */
  fromWorker(local: LocalRank, m: FromWorker, payload: Buffer): void {
    switch (m.op) {
      case "ready":
        return this.host.loaded(local, m);
      case "error":
        return this.host.workerError(local, m);
      case "allreduce": {
        // A request of an abandoned attempt is never served (its worker reads the abort next).
        if (!live(local, m.attempt)) return;
        // Its elements: the payload, or the first of the buffer the sending worker shares.
        let data: Float32Array | Buffer = payload;
        if (m.shared) {
          const shared = local.worker?.shared;
          if (!shared) return this.host.fail(`rank ${local.rank} asked for a shared-buffer all-reduce but shares no buffer`, "internal", local.rank);
          try {
            data = shared.floats(m.count);
          } catch (err) {
            return this.host.fail(`rank ${local.rank}: ${errorMessage(err)}`, "internal", local.rank);
          }
        }
        local.queue = local.queue.then(() => this.#allReduce(local, m.id, m.count, m.codec, data, m.attempt, m.group));
        return;
      }
      case "allgather":
        if (!live(local, m.attempt)) return;
        local.queue = local.queue.then(() => this.#allGather(local, m.id, payload, m.attempt, m.group));
        return;
      case "pipe_send":
        if (!live(local, m.attempt)) return;
        local.queue = local.queue.then(() => this.#pipeSend(local, m.id, m.to, m.tag, payload, m.attempt));
        return;
      case "pipe_recv":
        if (!live(local, m.attempt)) return;
        local.queue = local.queue.then(() => this.#pipeRecv(local, m.id, m.from, m.tag, m.attempt));
        return;
      default: {
        // A report: passed on once the collectives it queued have counted their bytes.
        const report = m as Record<string, unknown>;
        const large = payload.byteLength > REPORT_PART_BYTES;
        const pass = () => {
          this.host.observe(local.rank, report);
          const collectives = local.collectives.splice(0);
          const envelope = { t: "report", rank: local.rank, bytes_sent: local.bytesSinceReport, report, ...(collectives.length ? { collectives } : {}) } as const;
          local.bytesSinceReport = 0;
          if (large) return this.host.sendInParts(envelope, payload);
          this.host.send({ ...envelope, ...(payload.byteLength > 0 ? { payload } : {}) });
        };
        // A large one (a state) goes out in parts, which nothing of this rank overtakes.
        if (large) local.queue = local.queue.then(pass).catch((err: unknown) => this.host.fail(`passing on rank ${local.rank}'s ${String(report.op)}: ${errorMessage(err)}`, "internal", local.rank));
        else void local.queue.then(pass);
      }
    }
  }

  /** The ring a collective runs on: the job's, or (group "stage") the rank's stage replicas'. */
  #ringFor(local: LocalRank, group: "stage" | undefined): RingAllReduce | "lone" | null {
    return group === "stage" ? this.host.stageRingOf(local.rank) : this.host.ringOf(local.rank);
  }

  async #pipeSend(local: LocalRank, id: number, to: number, tag: string, payload: Buffer, attempt: number) {
    const pipe = this.host.pipeOf(local.rank, to);
    if (!local.worker || !live(local, attempt)) return;
    if (!pipe) return this.host.ringLost(local, `rank ${local.rank} has no pipe to rank ${to} in this epoch`);
    try {
      const stats = await pipe.send(tag, payload);
      local.bytesSinceReport += stats.bytesSent;
    } catch (err) {
      return this.host.ringLost(local, `pipe from rank ${local.rank} to rank ${to} failed: ${errorMessage(err)}`);
    }
    if (live(local, attempt)) local.worker.send({ op: "pipe_sent", id });
  }

  async #pipeRecv(local: LocalRank, id: number, from: number, tag: string, attempt: number) {
    const pipe = this.host.pipeOf(local.rank, from);
    if (!local.worker || !live(local, attempt)) return;
    if (!pipe) return this.host.ringLost(local, `rank ${local.rank} has no pipe from rank ${from} in this epoch`);
    let data: Uint8Array;
    try {
      data = await pipe.recv(tag);
    } catch (err) {
      return this.host.ringLost(local, `pipe into rank ${local.rank} from rank ${from} failed: ${errorMessage(err)}`);
    }
    if (live(local, attempt)) local.worker.send({ op: "pipe_data", id, tag }, data);
  }

  async #allGather(local: LocalRank, id: number, payload: Buffer, attempt: number, group?: "stage") {
    const ring = this.#ringFor(local, group);
    if (!ring || !local.worker || !live(local, attempt)) return;
    if (ring === "lone") return local.worker.send({ op: "allgather_result", id, sizes: [payload.byteLength] }, payload);
    try {
      const { blobs, stats } = await ring.allGather(payload);
      local.bytesSinceReport += stats.bytesSent;
      if (live(local, attempt)) local.worker.send({ op: "allgather_result", id, sizes: blobs.map((b) => b.byteLength) }, Buffer.concat(blobs));
    } catch (err) {
      this.host.ringLost(local, `ring all-gather failed on rank ${local.rank}: ${errorMessage(err)}`);
    }
  }

  /**
   * What an all-reduce runs on: a stage's ring, or on the job's links the direct all-reduce
   * when the round's order chose it for an all-reduce of this size and its links are up,
   * else the job's ring.
   */
  #reducerFor(local: LocalRank, group: "stage" | undefined, count: number, codec: WireCodec, attempt: number): RingAllReduce | DirectAllReduce | "lone" | null {
    const choice = local.collective.get(attempt) ?? null;
    if (group === undefined && choice && (choice.direct_max_bytes === null || wirePayloadBytes(codec, count) <= choice.direct_max_bytes)) {
      const direct = this.host.directOf(local.rank);
      if (direct) return direct;
    }
    return this.#ringFor(local, group);
  }

  async #allReduce(local: LocalRank, id: number, count: number, codec: WireCodec, input: Float32Array | Buffer, attempt: number, group?: "stage") {
    const ring = this.#reducerFor(local, group, count, codec, attempt);
    if (!ring || !local.worker || !live(local, attempt)) return;
    const shared = input instanceof Float32Array;
    const reply: ToWorker = shared ? { op: "allreduce_result", id, dtype: "float32", count, codec, shared: true } : { op: "allreduce_result", id, dtype: "float32", count, codec };
    if (ring === "lone") return local.worker.send(reply, shared ? undefined : input);
    // Float32Array needs 4-byte alignment; the link decoder's slices need not have it.
    const data = shared
      ? input
      : input.byteOffset % 4 === 0
        ? new Float32Array(input.buffer, input.byteOffset, count)
        : new Float32Array(input.buffer.slice(input.byteOffset, input.byteOffset + count * 4));
    try {
      const stats = await ring.allReduce(data, { codec });
      local.bytesSinceReport += stats.bytesSent;
      if (group === undefined && local.collectives.length < 4096) local.collectives.push({ algorithm: "algorithm" in ring ? ring.algorithm : "ring", bytes: wirePayloadBytes(codec, count), seconds: stats.seconds });
    } catch (err) {
      // The worker stays blocked in its collective until the coordinator's abort decision.
      this.host.ringLost(local, `${"algorithm" in ring ? "direct" : "ring"} all-reduce failed on rank ${local.rank}: ${errorMessage(err)}`);
      return;
    }
    if (!live(local, attempt)) return;
    local.worker.send(reply, shared ? undefined : new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  }
}
