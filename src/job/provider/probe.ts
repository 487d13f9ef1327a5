import { errorMessage } from "../../errors.js";
import type { BenchHello } from "../../net/auth.js";
import { measurePeer } from "../../net/peerBench.js";
import type { ProviderJob } from "./job.js";

/**
 * `probe_links`: this host's upload to the provider of each local member's ring successor
 * (`/bench`, with the job's credential). One measurement per peer host, one at a time:
 * they share this host's uplink. Nulls when the successor runs on this host.
 */
export async function probeLinks(job: ProviderJob, bytes: number, hello: (binding: Buffer) => BenchHello, throttle?: (bytes: number) => Promise<void>, latencyMs?: number): Promise<void> {
  const { mesh } = job;
  const results = new Map<string, Promise<{ rtt_ms: number; upload_bytes_per_s: number }>>();
  for (const local of job.ranks.filter((r) => !r.gone && mesh.inRing(r.rank))) {
    const next = mesh.neighbours(local.rank).next;
    const peer = mesh.peerOf(next);
    if (job.ranks.some((r) => r.rank === next) || !peer || mesh.members.length === 1) {
      job.sendLink({ t: "link", rank: local.rank, to: next, rtt_ms: null, upload_bytes_per_s: null });
      continue;
    }
    const base = peer.url.replace(/\/ring$/, "");
    if (!results.has(base)) {
      const previous = [...results.values()].at(-1)?.catch(() => undefined) ?? Promise.resolve();
      results.set(
        base,
        previous.then(async () => {
          const m = await measurePeer(base, hello, { pings: 5, bytes, throttle, expectKey: peer.key, latencyMs });
          return { rtt_ms: m.rtt_ms.median, upload_bytes_per_s: m.upload_bytes_per_s };
        }),
      );
    }
    try {
      job.sendLink({ t: "link", rank: local.rank, to: next, ...(await results.get(base)!) });
    } catch (err) {
      job.fail(`rank ${local.rank} could not measure its link to rank ${next} at ${base}: ${errorMessage(err)}`, "ring", local.rank);
    }
  }
}
