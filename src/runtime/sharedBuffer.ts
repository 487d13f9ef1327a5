/**
 * The memory a provider shares with one of its workers (docs/protocol.md, "Worker link",
 * "Shared buffer"): an anonymous memory file (memfd) that the provider makes and the worker
 * inherits as fd 4. An all-reduce does not travel over the worker link's socket: the
 * worker writes its buffer into the file and asks for the all-reduce (`shared: true`), the
 * collective runs on a Float32Array over the same pages, and the worker reads the sum where
 * it wrote its buffer. No copy of the gradient is made on either side, so the provider holds
 * none of its own (its share of the pages is the worker's, counted once).
 *
 * Node cannot map files, so this needs the native addon (native/shm.c, built at install by
 * scripts/build-native.mjs). Without it (not built, not Linux, or NIMBLE_SHARED_BUFFER=0)
 * `SharedBuffer.create` gives null and every all-reduce goes over the socket as before.
 */
import { createRequire } from "node:module";
import path from "node:path";
import { ProtocolError } from "../errors.js";
import { PACKAGE_ROOT } from "./paths.js";
import { MAX_PAYLOAD_BYTES } from "./workerLink.js";

interface Addon {
  create(name: string): number;
  size(fd: number): number;
  map(fd: number, bytes: number): ArrayBuffer;
  close(fd: number): void;
}

/** The file descriptor a worker finds its shared buffer on. */
export const WORKER_SHARED_FD = 4;

let addon: Addon | null | undefined;
let unavailable = "";

function load(): Addon | null {
  if (addon !== undefined) return addon;
  addon = null;
  if (process.env.NIMBLE_SHARED_BUFFER === "0") {
    unavailable = "off (NIMBLE_SHARED_BUFFER=0)";
  } else if (process.platform !== "linux") {
    unavailable = `not available on ${process.platform}`;
  } else {
    try {
      addon = createRequire(import.meta.url)(path.join(PACKAGE_ROOT, "build", "Release", "nimble_shm.node")) as Addon;
    } catch (err) {
      unavailable = `the native addon is not built (npm run build:native): ${(err as Error).message.split("\n")[0]}`;
    }
  }
  return addon;
}

/** Whether workers get a shared buffer here, and why not. */
export function sharedBufferSupport(): { available: boolean; reason?: string } {
  return load() ? { available: true } : { available: false, reason: unavailable };
}

export class SharedBuffer {
  #map: ArrayBuffer | null = null;
  #closed = false;

  private constructor(
    private readonly lib: Addon,
    /** The provider's descriptor of the file (the worker's is fd 4). */
    readonly fd: number,
  ) {}

  /** A new, empty shared buffer, or null where there is none (see the module comment). */
  static create(label = "nimble-worker"): SharedBuffer | null {
    const lib = load();
    if (!lib) return null;
    try {
      return new SharedBuffer(lib, lib.create(label.replace(/[^A-Za-z0-9._-]/g, "_").slice(0, 48)));
    } catch (err) {
      unavailable = (err as Error).message;
      return null;
    }
  }

  /** The bytes the file holds now (the worker grows it). */
  get size(): number {
    return this.#closed ? 0 : this.lib.size(this.fd);
  }

  /**
   * The first `count` float32 values of the file, over the very pages the worker maps: a
   * ProtocolError when the file holds fewer (the worker must have written them first).
   * The file only grows (it is sealed against shrinking), so a view stays valid.
   */
  floats(count: number): Float32Array {
    if (this.#closed) throw new ProtocolError("the worker's shared buffer is closed");
    const bytes = count * 4;
    // No more than a payload could carry: pages the worker never wrote are the provider's to fill.
    if (bytes > MAX_PAYLOAD_BYTES) throw new ProtocolError(`an all-reduce of ${count} float32 elements, more than the ${MAX_PAYLOAD_BYTES} bytes one may cover`);
    if (!this.#map || this.#map.byteLength < bytes) {
      const size = this.lib.size(this.fd);
      if (size < bytes) throw new ProtocolError(`an all-reduce of ${count} float32 elements in a shared buffer of ${size} bytes`);
      // The whole file: the next all-reduce of the same size finds it mapped.
      this.#map = this.lib.map(this.fd, size - (size % 4));
    }
    return new Float32Array(this.#map, 0, count);
  }

  /** Close the provider's descriptor; the mapping goes with its last view. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#map = null;
    try {
      this.lib.close(this.fd);
    } catch {
      // already closed
    }
  }
}
