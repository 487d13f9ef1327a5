import { afterEach, describe, expect, it } from "vitest";
import { z } from "zod";
import { LocalRank } from "../../../src/job/provider/rank.js";
import { Relay, type RelayHost } from "../../../src/job/provider/relay.js";
import { REPORT_PART_BYTES, type ToCoordinator } from "../../../src/protocol/messages.js";
import { fromWorker, strategyOrders } from "../../../src/protocol/workerOps.js";

// A strategy the provider has never heard of: its worker operations are in the schema only.
const tables = { orders: strategyOrders as Record<string, Record<string, z.ZodTypeAny>>, reports: fromWorker as Record<string, z.ZodTypeAny> };
afterEach(() => {
  delete tables.orders.gossip;
  delete tables.reports.gossip_done;
});

function harness(linked = true, ring: ReturnType<RelayHost["ringOf"]> = null) {
  const sent: ToCoordinator[] = [];
  const toWorker: { header: Record<string, unknown>; payload?: Uint8Array }[] = [];
  const failures: string[] = [];
  const local = new LocalRank(3, "cpu", () => {});
  local.worker = { send: (header: Record<string, unknown>, payload?: Uint8Array) => toWorker.push({ header, payload }), pid: 1 } as unknown as LocalRank["worker"];
  if (linked) {
    local.on("loaded");
    local.on("linked");
  }
  const host: RelayHost = {
    rank: (r) => (r === 3 ? local : undefined),
    inRing: (r) => r === 3,
    ringOf: () => ring,
    abortAttempts: () => {},
    send: (m) => sent.push(m),
    sendInParts: async (report, payload) => {
      sent.push({ ...report, payload_bytes: payload.byteLength });
      for (let at = 0; at < payload.byteLength; at += REPORT_PART_BYTES) sent.push({ t: "report_part", rank: report.rank, payload: payload.subarray(at, at + REPORT_PART_BYTES) });
    },
    loaded: () => {},
    workerError: () => {},
    ringLost: () => {},
    observe: () => {},
    fail: (message) => failures.push(message),
  };
  return { relay: new Relay(host), local, sent, toWorker, failures };
}

describe("the provider's relay", () => {
  it("passes a new strategy's orders and reports through unread, giving its rounds an attempt", async () => {
    tables.orders.gossip = { gossip_round: z.object({ op: z.literal("gossip_round"), step: z.number().int(), peers: z.array(z.number().int()), attempt: z.number().int() }) };
    tables.reports.gossip_done = z.object({ op: z.literal("gossip_done"), step: z.number().int(), mixed: z.number() });
    const { relay, local, sent, toWorker, failures } = harness();
    relay.order({ t: "order", ranks: [3], order: { op: "gossip_round", step: 7, peers: [1, 2] } });
    relay.order({ t: "order", ranks: [3], order: { op: "gossip_round", step: 8, peers: [2] } });
    expect(failures).toEqual([]);
    expect(toWorker.map((w) => w.header)).toEqual([
      { op: "gossip_round", step: 7, peers: [1, 2], attempt: 1 },
      { op: "gossip_round", step: 8, peers: [2], attempt: 2 },
    ]);
    expect(local.state).toBe("stepping");
    relay.fromWorker(local, { op: "gossip_done", step: 8, mixed: 0.5 } as never, Buffer.alloc(0));
    await local.queue;
    await new Promise((r) => setImmediate(r));
    expect(sent).toEqual([{ t: "report", rank: 3, bytes_sent: 0, report: { op: "gossip_done", step: 8, mixed: 0.5 } }]);
  });

  it("refuses orders that are not worker operations a coordinator may send, or that break their schema", () => {
    const { relay, toWorker, failures } = harness();
    relay.order({ t: "order", ranks: [3], order: { op: "init", task_path: "/etc/passwd" } });
    relay.order({ t: "order", ranks: [3], order: { op: "eval", step: -1, start: 0, count: 1, batch_size: 1 } });
    relay.order({ t: "order", ranks: [3], order: { op: "load_state", files: [{ name: "model.pt", size: 4 }] }, payload: new Uint8Array(3) });
    relay.order({ t: "order", ranks: [3], order: { op: "load_state", files: [{ name: "../x", size: 0 }] } });
    relay.order({ t: "order", ranks: [9], order: { op: "sync" } });
    expect(toWorker).toEqual([]);
    expect(failures).toEqual([
      "the coordinator sent an order init that is not a worker operation it may send",
      expect.stringMatching(/^the coordinator sent an invalid eval order: step:/),
      "the coordinator sent a load_state order with a 3-byte payload, 4 expected",
      expect.stringMatching(/^the coordinator sent an invalid load_state order: files\.0\.name:/),
      "an order for rank 9, which this provider does not host",
    ]);
  });

  it("a round order for a rank whose ring has not formed is refused, not crashed on", () => {
    const { relay, toWorker, failures } = harness(false);
    relay.order({ t: "order", ranks: [3], order: { op: "step", step: 0, shares: [8], want_hash: false } });
    expect(failures).toEqual(["a step order for rank 3 before its ring formed"]);
    expect(toWorker).toEqual([]);
  });
});

describe("the payload path", () => {
  /** A ring that adds `by` to every element, as a sum with other members would. */
  const ringAdding = (by: number, seen: Float32Array[]) =>
    ({
      allReduce: async (data: Float32Array) => {
        seen.push(data);
        for (let i = 0; i < data.length; i++) data[i] += by;
        return { op: 0, bytesSent: 8, payloadBytes: 8, frames: 1, seconds: 0 };
      },
    }) as unknown as NonNullable<ReturnType<RelayHost["ringOf"]>>;

  it("sums a shared-buffer all-reduce in the worker's own memory and replies without a payload", async () => {
    const seen: Float32Array[] = [];
    const { relay, local, toWorker, failures } = harness(true, ringAdding(10, seen));
    const memory = new Float32Array([1, 2, 3, 4, 5]);
    (local.worker as unknown as { shared: unknown }).shared = { floats: (n: number) => memory.subarray(0, n) };
    relay.fromWorker(local, { op: "allreduce", id: 4, dtype: "float32", count: 3, codec: "f32", attempt: 0, shared: true }, Buffer.alloc(0));
    await local.queue;
    expect(failures).toEqual([]);
    expect([...memory]).toEqual([11, 12, 13, 4, 5]);
    expect(seen[0].buffer).toBe(memory.buffer); // no copy of it was made
    expect(toWorker).toEqual([{ header: { op: "allreduce_result", id: 4, dtype: "float32", count: 3, codec: "f32", shared: true }, payload: undefined }]);
  });

  it("refuses a shared-buffer all-reduce from a worker that shares none, or beyond what it wrote", async () => {
    const { relay, local, failures } = harness();
    relay.fromWorker(local, { op: "allreduce", id: 0, dtype: "float32", count: 3, codec: "f32", attempt: 0, shared: true }, Buffer.alloc(0));
    (local.worker as unknown as { shared: unknown }).shared = {
      floats: () => {
        throw new Error("an all-reduce of 9 float32 elements in a shared buffer of 8 bytes");
      },
    };
    relay.fromWorker(local, { op: "allreduce", id: 1, dtype: "float32", count: 9, codec: "f32", attempt: 0, shared: true }, Buffer.alloc(0));
    await local.queue;
    expect(failures).toEqual(["rank 3 asked for a shared-buffer all-reduce but shares no buffer", "rank 3: an all-reduce of 9 float32 elements in a shared buffer of 8 bytes"]);
  });

  it("passes a large report on in parts that nothing of its rank overtakes", async () => {
    const { relay, local, sent } = harness();
    const payload = Buffer.alloc(REPORT_PART_BYTES * 2 + 5, 7);
    relay.fromWorker(local, { op: "state", kind: "final", step: 3, files: [{ name: "model.safetensors", size: payload.byteLength }] }, payload);
    relay.fromWorker(local, { op: "loaded", step: 3 }, Buffer.alloc(0));
    await local.queue;
    await new Promise((r) => setImmediate(r));
    expect(sent.map((m) => (m.t === "report_part" ? `part ${m.payload.byteLength}` : m.t === "report" ? `${m.report.op} ${m.payload_bytes ?? "-"}` : m.t))).toEqual([
      `state ${payload.byteLength}`,
      `part ${REPORT_PART_BYTES}`,
      `part ${REPORT_PART_BYTES}`,
      "part 5",
      "loaded -",
    ]);
  });
});
