import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { describe, expect, it } from "vitest";
import type { TrainSummary } from "../../src/job/coordinator/index.js";
import { findChromium, screenshot, withBrowser } from "../../src/report/browser.js";
import { buildReport } from "../../src/report/html.js";
import { loadRun } from "../../src/runs/runData.js";
import { nimble, type TempDir, useE2E } from "../helpers/processes.js";
import { tinyTask } from "../helpers/tasks.js";

// A report of a real run, opened in real headless Chromium: what the page shows, not what
// the HTML string contains. Without Chromium this file is skipped, except in CI where it fails.

const chromium = await findChromium().catch(() => null);
const NO_CHROMIUM = "no Chromium found: apt install chromium, or set NIMBLE_CHROMIUM";

if (!chromium && process.env.CI) {
  describe("nimble report in a browser", () => {
    it("needs Chromium in CI", () => {
      throw new Error(NO_CHROMIUM);
    });
  });
}

const STEPS = 12;
const CHARTS = ["loss-by-step", "loss-by-time", "throughput", "shares", "bytes"];

describe.skipIf(!chromium)(`nimble report in headless Chromium${chromium ? "" : ` (skipped: ${NO_CHROMIUM})`}`, () => {
  let python = "";
  let tmp: TempDir;
  useE2E((env) => ({ python, tmp } = env));

  /** A tiny real run: 2 local workers, validation loss and accuracy every 4 steps. */
  async function trainTinyRun(): Promise<string> {
    const task = tinyTask({
      features: 8,
      extra: `
def evaluate(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": torch.nn.functional.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(1) == y).float().mean().item()}
`,
    });
    await writeFile(path.join(tmp.dir, "task.py"), task);
    const config = path.join(tmp.dir, "nimble.yaml");
    await writeFile(
      config,
      [
        "name: report-e2e",
        "task: task.py",
        `steps: ${STEPS}`,
        "batch_size: 32",
        "optimizer: {name: sgd, lr: 0.1}",
        "eval: {every: 4, samples: 64, batch_size: 64}",
        "local_workers: 2",
        `output: ${path.join(tmp.dir, "runs")}`,
      ].join("\n") + "\n",
    );
    const result = await nimble(["train", config, "--json", "--python", python], { timeout: 240_000 });
    expect(result.exitCode, String(result.stderr)).toBe(0);
    const done = String(result.stdout)
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l))
      .find((e) => e.type === "done");
    expect(done?.run_dir).toBeTruthy();
    return done.run_dir as string;
  }

  /**
   * The tiny run has no faults, and causing real ones takes a chaos setup (see
   * test/e2e/faults.test.ts): add two to its summary.json instead, one in the older form
   * without wall_s, so the report's markers are exercised against real metrics.
   */
  async function injectFaults(runDir: string): Promise<TrainSummary> {
    const file = path.join(runDir, "summary.json");
    const summary = JSON.parse(await readFile(file, "utf8")) as TrainSummary;
    const metrics = (await readFile(path.join(runDir, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
    summary.faults = [
      { step: 3, wall_s: metrics[3].wall_s - 0.01, kind: "worker died", ranks: [1], reason: "worker for rank 1 was killed by SIGKILL", recovery_s: 1.2 },
      { step: 8, kind: "ring broken", ranks: [], reason: "ring link 0 -> 1 closed", recovery_s: null } as unknown as TrainSummary["faults"][number],
    ];
    summary.steps_redone = [3, 8];
    await writeFile(file, JSON.stringify(summary, null, 2));
    return summary;
  }

  it("shows every chart, the run's figures and each fault, loads nothing else, and screenshots to a PNG", async () => {
    const runDir = await trainTinyRun();
    const summary = await injectFaults(runDir);
    const run = await loadRun(runDir);
    const htmlPath = path.join(tmp.dir, "report.html");
    await writeFile(htmlPath, buildReport(run));
    const url = pathToFileURL(htmlPath).href;

    const seen = await withBrowser(async (browser) => {
      const page = await browser.newPage();
      await page.navigate(url);
      await page.fitToContent(1000);
      const shown = await page.evaluate<{
        charts: { id: string; width: number; height: number; faults: number; series: number }[];
        summary: Record<string, string>;
        faultRows: number;
      }>(`(() => ({
        charts: [...document.querySelectorAll("svg[data-chart]")].map((svg) => {
          const box = svg.getBoundingClientRect();
          return { id: svg.dataset.chart, width: box.width, height: box.height,
                   faults: svg.querySelectorAll(".fault-marker").length, series: svg.querySelectorAll(".series").length };
        }),
        summary: Object.fromEntries([...document.querySelectorAll("#summary tr")].map((tr) => [tr.querySelector("th").textContent, tr.querySelector("td").textContent])),
        faultRows: document.querySelectorAll("table.faults tbody tr").length,
      }))()`);
      return { ...shown, requests: [...page.requests] };
    }, { executable: chromium! });

    expect(seen.charts.map((c) => c.id)).toEqual(CHARTS);
    for (const chart of seen.charts) {
      expect(chart.width, chart.id).toBeGreaterThan(300);
      expect(chart.height, chart.id).toBeGreaterThan(150);
      expect(chart.series, chart.id).toBeGreaterThan(0);
      expect(chart.faults, chart.id).toBe(summary.faults.length);
    }
    expect(seen.summary.Steps).toBe(String(STEPS));
    expect(seen.summary["Final loss"]).toBe(summary.final_loss!.toFixed(4));
    expect(seen.summary["Final validation"]).toMatch(/^loss \d\.\d{4}, accuracy \d\.\d{4} \(step 11\)$/);
    expect(seen.summary.Status).toBe("completed");
    expect(seen.faultRows).toBe(2);
    // The file itself, and nothing else: no fonts, scripts, images or anything remote.
    expect(seen.requests.filter((r) => r !== url)).toEqual([]);

    const pngPath = path.join(tmp.dir, "report.png");
    const size = await screenshot(htmlPath, pngPath, { width: 1000, executable: chromium! });
    const png = await readFile(pngPath);
    expect(png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))).toBe(true);
    // IHDR: width and height are the first fields of the first chunk; the full page is captured.
    expect(png.readUInt32BE(16)).toBe(1000);
    expect(png.readUInt32BE(20)).toBe(size.height);
    expect(size.height).toBeGreaterThan(2000);
    expect(png.length).toBeGreaterThan(50_000);
  }, 300_000);
});
