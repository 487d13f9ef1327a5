import type { ProviderEvent, StatsEvent } from "../../src/job/provider/index.js";

export const listening: Extract<ProviderEvent, { type: "listening" }> = {
  type: "listening",
  url: "wss://0.0.0.0:7070",
  host: "0.0.0.0",
  port: 7070,
  token: "3f2a9c0d11e4b7a8",
  key: "ed25519:yjP1F8x4GVlsVq9W614XG5oohUmayfKgQsGreja7iQ8",
  fingerprint: "829b:3375:1418:d6d2",
  allow: null,
  limits: { sandbox: "bwrap", max_memory_bytes: 8e9, max_processes: 512, max_file_bytes: 16 * 1024 ** 3, max_job_hours: 12, job_requirements: true },
  devices: [{ id: "cuda:0", kind: "cuda", name: "NVIDIA A100-SXM4-80GB", memory_bytes: 85_899_345_920 }],
  profile: { device: "cuda:0", matmul_gflops_fp32: 19_480.4, memory_gbps: 1555.2, measured_at: "2025-06-01T10:00:00.000Z" },
};

export const jobStart: ProviderEvent = {
  type: "job",
  job: "job-7f3a",
  name: "mnist-cnn",
  ranks: [1, 2],
  world_size: 4,
  coordinator: { fingerprint: "5e0c:91aa:03b2:7d41", key: "ed25519:Ab3kP1F8x4GVlsVq9W614XG5oohUmayfKgQsGreja7i", address: "10.0.0.9" },
  task_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
};

export function stats(over: Partial<StatsEvent> = {}): StatsEvent {
  return {
    type: "stats",
    job: "job-7f3a",
    name: "mnist-cnn",
    elapsed_s: 60,
    step: 120,
    steps: 120,
    samples: 3840,
    ranks: [
      { rank: 1, device: "cuda:0", steps: 120, samples: 1920, compute_ms: 12.4, comm_ms: 4.2 },
      { rank: 2, device: "cuda:1", steps: 120, samples: 1920, compute_ms: 13, comm_ms: 3.9 },
    ],
    ring: { sent: 12_300_000, received: 12_000_000 },
    control: { sent: 100_000, received: 120_000 },
    ...over,
  };
}
