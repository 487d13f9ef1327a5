import { afterEach, describe, expect, it } from "vitest";
import { z } from "zod";
import { LocalRank } from "../../../src/job/provider/rank.js";
import { Relay, type RelayHost } from "../../../src/job/provider/relay.js";
import type { ToCoordinator } from "../../../src/protocol/messages.js";
import { fromWorker, strategyOrders } from "../../../src/protocol/workerOps.js";

// A strategy the provider has never heard of: its worker operations are in the schema only.
const tables = { orders: strategyOrders as Record<string, Record<string, z.ZodTypeAny>>, reports: fromWorker as Record<string, z.ZodTypeAny> };
afterEach(() => {
  delete tables.orders.gossip;
  delete tables.reports.gossip_done;
});

function harness(linked = true) {
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
    ringOf: () => null,
    abortAttempts: () => {},
    send: (m) => sent.push(m),
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
