import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { UserError, errorMessage } from "../errors.js";
import { screenshot } from "../report/browser.js";
import { buildReport, reportData } from "../report/html.js";
import { loadRun, resolveRun } from "../runs/runData.js";

export interface ReportOptions {
  /** HTML file to write (default: report.html in the run directory). */
  out?: string;
  /** Also render the report to this PNG. */
  screenshot?: string;
  json?: boolean;
  /** Folder the runs are in, for runs named rather than given as a path. */
  output?: string;
}

async function writeTo(file: string, content: string | Buffer): Promise<void> {
  try {
    await mkdir(path.dirname(file), { recursive: true });
    await writeFile(file, content);
  } catch (err) {
    throw new UserError(`Could not write ${file}: ${errorMessage(err)}`, "Pass --out with a path you can write to.");
  }
}

/** `nimble report RUN`: a self-contained HTML report of a run directory, optionally a PNG of it. */
export async function reportCommand(runArg: string, opts: ReportOptions = {}): Promise<void> {
  const run = await loadRun(await resolveRun(runArg, opts.output ?? "runs"));
  for (const p of run.problems) process.stderr.write(`warning: ${run.dir}: ${p}\n`);
  const htmlPath = path.resolve(opts.out ?? path.join(run.dir, "report.html"));
  await writeTo(htmlPath, buildReport(run));
  let pngPath: string | undefined;
  if (opts.screenshot) {
    pngPath = path.resolve(opts.screenshot);
    await mkdir(path.dirname(pngPath), { recursive: true });
    await screenshot(htmlPath, pngPath);
  }
  if (opts.json) {
    process.stdout.write(JSON.stringify({ report: htmlPath, ...(pngPath ? { screenshot: pngPath } : {}), data: reportData(run) }) + "\n");
  } else {
    process.stdout.write(`${htmlPath}\n${pngPath ? `${pngPath}\n` : ""}`);
  }
}
