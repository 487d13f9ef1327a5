import { ftruncateSync, writeSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { SharedBuffer, sharedBufferSupport } from "../../src/runtime/sharedBuffer.js";

// The native addon is built at install (npm run build:native); where it is not, workers carry payloads.
const support = sharedBufferSupport();

describe.skipIf(!support.available)("the buffer a provider shares with its worker", () => {
  it("maps what the worker wrote, sees it grow, and cannot be shrunk under its mapping", () => {
    const shared = SharedBuffer.create("test")!;
    expect(shared.size).toBe(0);
    expect(() => shared.floats(4)).toThrow(/4 float32 elements in a shared buffer of 0 bytes/);
    ftruncateSync(shared.fd, 16); // the worker grows it ...
    const bytes = new Float32Array([1.5, -2, 3, 4]);
    writeSync(shared.fd, new Uint8Array(bytes.buffer), 0, 16, 0); // ... and writes its elements
    const view = shared.floats(4);
    expect([...view]).toEqual([1.5, -2, 3, 4]);
    view[1] = 10; // the sum goes where the worker reads it
    expect([...shared.floats(2)]).toEqual([1.5, 10]);
    expect(() => ftruncateSync(shared.fd, 0)).toThrow(/EPERM|not permitted/);
    ftruncateSync(shared.fd, 1 << 20);
    const big = shared.floats(1 << 18);
    expect(big.length).toBe(1 << 18);
    expect(big[1]).toBe(10);
    expect(() => shared.floats(2 ** 29 + 1)).toThrow(/more than the 2147483648 bytes/);
    shared.close();
    expect(() => shared.floats(1)).toThrow(/closed/);
  });
});

describe("without the addon", () => {
  it("says why workers share no buffer", () => {
    if (support.available) expect(support.reason).toBeUndefined();
    else expect(support.reason).toMatch(/addon|NIMBLE_SHARED_BUFFER|not available/);
  });
});
