import type { CollectiveChoice } from "../../protocol/messages.js";
import type { CoordinatorOrder } from "../../protocol/workerOps.js";
import type { Providers } from "./providers.js";

/**
 * Order the workers of `ranks`: one `order` envelope per provider, which passes it on to
 * each of its workers named (src/protocol/workerOps.ts has the orders' schemas).
 */
export function sendOrder(providers: Providers, ranks: readonly number[], order: CoordinatorOrder, payload?: Uint8Array, collective?: CollectiveChoice): void {
  for (const client of providers.clientsOf(ranks)) {
    const mine = ranks.filter((rank) => providers.ranks[rank].client === client);
    client.send({ t: "order", ranks: mine, order: order as Record<string, unknown>, ...(payload ? { payload } : {}), ...(collective ? { collective } : {}) });
  }
}
