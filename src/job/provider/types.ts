import type { DeviceInfo, LogLevel, ProviderLimits, ProviderProfile, ToProvider } from "../../protocol/messages.js";
import type { PythonEnv } from "../../runtime/python.js";
import type { Identity } from "../../identity/identity.js";
import type { WorkerLimits } from "../../runtime/limits.js";
import type { SandboxSupport } from "../../runtime/sandbox.js";
import type { WorkerState } from "./lifecycle.js";
import type { SpareEvent } from "./spares.js";

export type { WorkerState };

/** Bytes this host sent and received on some links, counted where the frames are handed over. */
export interface LinkBytes {
  sent: number;
  received: number;
}

/** One local rank's part in the job so far. */
export interface RankStats {
  rank: number;
  device: string;
  /** Steps it computed and that were not abandoned (a step redone after a fault counts once). */
  steps: number;
  /** The sum of its shares over those steps: what the coordinator counts for it. */
  samples: number;
  /** Its last step's compute and all-reduce wait, when it has run one. */
  compute_ms: number | null;
  comm_ms: number | null;
}

export type { LogLevel };

export type ProviderEvent =
  | {
      type: "listening";
      url: string;
      host: string;
      port: number;
      /** Token mode: what coordinators prove they know (null in key mode). */
      token: string | null;
      /** This provider's identity key (its certificate's), and its fingerprint. */
      key: string;
      fingerprint: string;
      /** Key mode: the coordinator keys it admits (null in token mode). */
      allow: string[] | null;
      /** The owner's limits in force: confinement, memory, processes, file size, job hours. */
      limits: ProviderLimits;
      devices: DeviceInfo[];
      /** This host's measured profile, as advertised to coordinators (null with --no-profile). */
      profile: ProviderProfile | null;
      /** Whether it keeps a warm worker per device for the next job (false with --no-warm). */
      warm: boolean;
    }
  | { type: "log"; line: string; level: LogLevel }
  | {
      type: "job";
      job: string;
      name: string;
      ranks: number[];
      world_size: number;
      /** Who started it: the coordinator's key fingerprint and address. */
      coordinator: { fingerprint: string; key: string; address: string };
      /** sha256 of the task file it runs (hex), for the owner to know what code that is. */
      task_sha256: string;
    }
  | { type: "worker"; job: string; rank: number; device: string; state: WorkerState; restarts: number; pid: number | null; detail?: string }
  | {
      type: "stats";
      job: string;
      name: string;
      /** Seconds since the job arrived here. */
      elapsed_s: number;
      /** The job's last step this host reported, counted from 1 as `nimble train` shows it (0: none yet). */
      step: number;
      /** Steps at least one local rank took part in. */
      steps: number;
      /** Samples contributed by the local ranks: the sum of their shares over their steps. */
      samples: number;
      ranks: RankStats[];
      /** Ring links of the job (gradient and state frames, hellos included). */
      ring: LinkBytes;
      /** The coordinator's control connection that carries the job (task file and checkpoints included). */
      control: LinkBytes;
    }
  | { type: "job_end"; job: string; reason: string }
  /** A warm spare (src/job/provider/spares.ts) starting, ready (torch imported), taken by a job, or gone. */
  | SpareEvent;

export type StatsEvent = Extract<ProviderEvent, { type: "stats" }>;
export type WorkerEvent = Extract<ProviderEvent, { type: "worker" }>;

export interface ProviderOptions {
  host: string;
  port: number;
  /** This host's identity: its TLS certificate's key and what its proofs are signed with. */
  identity: Identity;
  /** Token mode (no `allow`): coordinators prove knowledge of it; default a random one. */
  token?: string;
  /** Key mode: admit only coordinators with these keys (no token is used). */
  allow?: string[];
  python: PythonEnv;
  devices: DeviceInfo[];
  /** torch intra-op threads per worker; default: this host's cores divided among its workers. */
  threads?: number;
  /**
   * Testing and benchmarking aid: run workers at this fraction of their speed (0 < s <= 1).
   * With `speedFile`, the file's number is re-read every half second and applied mid-run.
   */
  speed?: number;
  speedFile?: string;
  /** Largest micro-batch a worker runs at once; a larger share accumulates over several. */
  maxMicroBatch?: number;
  /**
   * How workers are confined (src/runtime/sandbox.ts): under bubblewrap, seeing `readOnly`
   * (the Python environment's prefixes) besides the system and the runtime; not at all
   * (the owner's --no-sandbox; in-process tests); or `unavailable`, when confinement was
   * wanted and this host cannot do it: then every job is refused, saying why.
   */
  confinement?: { kind: "bwrap"; support: SandboxSupport; readOnly: string[] } | { kind: "none" } | { kind: "unavailable"; reason: string };
  /** The owner's limits on each worker process (default DEFAULT_LIMITS). */
  limits?: WorkerLimits;
  /** A job running longer than this many hours is ended (--max-job-hours). */
  maxJobHours?: number;
  /** false: jobs that bring requirements of their own are refused (--no-job-requirements). */
  jobRequirements?: boolean;
  /** This host's measured profile, advertised to coordinators. */
  profile?: ProviderProfile;
  /** Keep a worker per device started, torch imported, for the next job (`nimble provide` does unless --no-warm; default false). */
  warm?: boolean;
  /**
   * Testing and benchmarking aid: pace everything this host uploads (ring frames, bench
   * uploads) to this many bytes/s, to reproduce a slow internet link over loopback.
   */
  linkRate?: number;
  /**
   * Testing and benchmarking aid: a one-way latency (ms) on this host's links. Ring frames
   * and coordinator messages are handed on this long after they arrive, and messages to the
   * coordinator leave this long after they are sent, so every round trip gains 2x.
   */
  latencyMs?: number;
  onEvent: (event: ProviderEvent) => void;
}

export type JobSpec = Extract<ToProvider, { t: "job" }>;

/** `stats` events go out at most this often while a job runs, and only when a figure changed. */
export const STATS_INTERVAL_MS = 500;
