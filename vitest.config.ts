import os from "node:os";
import path from "node:path";
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts", "test/**/*.test.tsx", "src/**/*.test.ts"],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // End-to-end tests start real providers and PyTorch workers; on a 2-core machine
    // running several such files at once only makes each slower and flakier.
    fileParallelism: false,
    // Identity keys the tests' `nimble` processes make stay out of the user's config folder.
    env: { NIMBLE_CONFIG_DIR: path.join(os.tmpdir(), `nimble-test-config-${process.pid}`) },
  },
});
