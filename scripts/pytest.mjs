// Runs python-runtime's pytest suite under the workers' interpreter ($NIMBLE_PYTHON or the
// managed environment that `nimble env` makes), installing pytest into it if missing.
import { execFileSync, spawnSync } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const out = execFileSync(process.execPath, [path.join(root, "dist", "cli.js"), "env", "--json"], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
const { python } = JSON.parse(out.trim().split("\n").pop());
if (spawnSync(python, ["-c", "import pytest"]).status !== 0) {
  console.error(`installing pytest into ${python}`);
  const pip = spawnSync(python, ["-m", "pip", "install", "--progress-bar", "off", "pytest"], { stdio: "inherit" });
  if (pip.status !== 0) process.exit(pip.status ?? 1);
}
const result = spawnSync(python, ["-m", "pytest", "python-runtime/tests", "-q", ...process.argv.slice(2)], { cwd: root, stdio: "inherit" });
process.exit(result.status ?? 1);
