/**
 * Headless Chromium for reports: a PNG of the report for humans, and for the tests a look
 * at what the page really shows. A minimal Chrome DevTools Protocol client over `ws`:
 * enough to open a page, evaluate script in it, list its network requests and screenshot it.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { access, constants, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import WebSocket from "ws";
import { UserError } from "../errors.js";

const CANDIDATES = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"];
const LAUNCH_TIMEOUT_MS = 30_000;
const COMMAND_TIMEOUT_MS = 30_000;

async function isExecutable(file: string): Promise<boolean> {
  try {
    await access(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** $NIMBLE_CHROMIUM, else the first of chromium, chromium-browser, google-chrome on PATH. */
export async function findChromium(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const hint = "Install one (Debian/Ubuntu: apt install chromium) or set NIMBLE_CHROMIUM to the browser's path.";
  if (env.NIMBLE_CHROMIUM) {
    if (await isExecutable(env.NIMBLE_CHROMIUM)) return env.NIMBLE_CHROMIUM;
    throw new UserError(`NIMBLE_CHROMIUM is ${env.NIMBLE_CHROMIUM}, which is not an executable file`, hint);
  }
  for (const dir of (env.PATH ?? "").split(path.delimiter).filter(Boolean)) {
    for (const name of CANDIDATES) {
      const file = path.join(dir, name);
      if (await isExecutable(file)) return file;
    }
  }
  throw new UserError(`No Chromium found (looked for ${CANDIDATES.join(", ")} on PATH)`, hint);
}

type Handler = (params: Record<string, unknown>, sessionId: string | undefined) => void;

/** One DevTools connection: numbered commands answered by id, events by method name. */
export class CdpConnection {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; method: string }>();
  private readonly handlers = new Map<string, Set<Handler>>();

  private constructor(private readonly socket: WebSocket) {
    socket.on("message", (data) => this.receive(String(data)));
    socket.on("close", () => this.failAll(new Error("DevTools connection closed")));
    socket.on("error", (err) => this.failAll(err));
  }

  static connect(url: string): Promise<CdpConnection> {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(url, { perMessageDeflate: false });
      socket.once("open", () => resolve(new CdpConnection(socket)));
      socket.once("error", reject);
    });
  }

  send<T = Record<string, unknown>>(method: string, params: Record<string, unknown> = {}, sessionId?: string): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`DevTools ${method} got no answer in ${COMMAND_TIMEOUT_MS / 1000} s`));
      }, COMMAND_TIMEOUT_MS);
      this.pending.set(id, {
        method,
        resolve: (v) => (clearTimeout(timer), resolve(v as T)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      });
      this.socket.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
    });
  }

  on(method: string, handler: Handler): () => void {
    let set = this.handlers.get(method);
    if (!set) this.handlers.set(method, (set = new Set()));
    set.add(handler);
    return () => set.delete(handler);
  }

  /** The next `method` event (for `sessionId`, when given). */
  waitFor(method: string, sessionId?: string, timeoutMs = COMMAND_TIMEOUT_MS): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => (off(), reject(new Error(`No ${method} in ${timeoutMs / 1000} s`))), timeoutMs);
      const off = this.on(method, (params, sid) => {
        if (sessionId && sid !== sessionId) return;
        clearTimeout(timer);
        off();
        resolve(params);
      });
    });
  }

  close(): void {
    this.socket.close();
  }

  private receive(text: string) {
    let msg: { id?: number; result?: unknown; error?: { message: string }; method?: string; params?: Record<string, unknown>; sessionId?: string };
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg.id !== undefined) {
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.error) p.reject(new Error(`DevTools ${p.method}: ${msg.error.message}`));
      else p.resolve(msg.result ?? {});
    } else if (msg.method) {
      for (const h of this.handlers.get(msg.method) ?? []) h(msg.params ?? {}, msg.sessionId);
    }
  }

  private failAll(err: Error) {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }
}

/** A tab: navigation, script, network log and screenshots through one attached session. */
export class Page {
  /** URLs of every request the page made, in order (the document itself included). */
  readonly requests: string[] = [];

  constructor(
    private readonly cdp: CdpConnection,
    readonly sessionId: string,
  ) {
    cdp.on("Network.requestWillBeSent", (params, sid) => {
      if (sid === sessionId) this.requests.push(String((params.request as { url?: string } | undefined)?.url ?? ""));
    });
  }

  send<T = Record<string, unknown>>(method: string, params: Record<string, unknown> = {}): Promise<T> {
    return this.cdp.send<T>(method, params, this.sessionId);
  }

  /** Load `url` and wait for its load event. */
  async navigate(url: string): Promise<void> {
    const loaded = this.cdp.waitFor("Page.loadEventFired", this.sessionId);
    const result = await this.send<{ errorText?: string }>("Page.navigate", { url });
    if (result.errorText) throw new Error(`Could not open ${url}: ${result.errorText}`);
    await loaded;
  }

  /** The value of a JavaScript expression in the page (JSON-serializable results only). */
  async evaluate<T>(expression: string): Promise<T> {
    const r = await this.send<{ result: { value?: T }; exceptionDetails?: { text: string; exception?: { description?: string } } }>("Runtime.evaluate", {
      expression,
      returnByValue: true,
      awaitPromise: true,
    });
    if (r.exceptionDetails) throw new Error(`In the page: ${r.exceptionDetails.exception?.description ?? r.exceptionDetails.text}`);
    return r.result.value as T;
  }

  /** Lay the page out `width` pixels wide, as tall as its content, and return that height. */
  async fitToContent(width: number): Promise<number> {
    await this.send("Emulation.setDeviceMetricsOverride", { width, height: 800, deviceScaleFactor: 1, mobile: false });
    const height = await this.evaluate<number>("Math.ceil(Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0))");
    await this.send("Emulation.setDeviceMetricsOverride", { width, height, deviceScaleFactor: 1, mobile: false });
    return height;
  }

  async screenshot(): Promise<Buffer> {
    const r = await this.send<{ data: string }>("Page.captureScreenshot", { format: "png", captureBeyondViewport: true });
    return Buffer.from(r.data, "base64");
  }
}

/** A headless Chromium with its own throwaway profile; `close` ends it and removes the profile. */
export class Browser {
  private constructor(
    private readonly child: ChildProcess,
    private readonly profile: string,
    readonly cdp: CdpConnection,
  ) {}

  static async launch(opts: { executable?: string } = {}): Promise<Browser> {
    const executable = opts.executable ?? (await findChromium());
    const profile = await mkdtemp(path.join(os.tmpdir(), "nimble-chromium-"));
    const args = [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--hide-scrollbars",
      "--remote-debugging-port=0",
      `--user-data-dir=${profile}`,
      "--no-first-run",
      "--no-default-browser-check",
      // Nothing of the browser's own (updates, sync, metrics) should touch the network.
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-extensions",
      "--mute-audio",
      "about:blank",
    ];
    // Its own process group, so closing kills the renderer and helper processes too.
    const child = spawn(executable, args, { stdio: ["ignore", "ignore", "pipe"], detached: true });
    try {
      const url = await devToolsUrl(child);
      return new Browser(child, profile, await CdpConnection.connect(url));
    } catch (err) {
      await stopProcess(child);
      await rm(profile, { recursive: true, force: true, maxRetries: 5 });
      throw err;
    }
  }

  /** A new blank tab with its page, runtime and network events enabled. */
  async newPage(): Promise<Page> {
    const { targetId } = await this.cdp.send<{ targetId: string }>("Target.createTarget", { url: "about:blank" });
    const { sessionId } = await this.cdp.send<{ sessionId: string }>("Target.attachToTarget", { targetId, flatten: true });
    const page = new Page(this.cdp, sessionId);
    await Promise.all([page.send("Page.enable"), page.send("Runtime.enable"), page.send("Network.enable")]);
    return page;
  }

  async close(): Promise<void> {
    try {
      await Promise.race([this.cdp.send("Browser.close"), new Promise((r) => setTimeout(r, 2_000))]);
    } catch {
      // Already gone: the process is stopped below either way.
    }
    this.cdp.close();
    await stopProcess(this.child);
    await rm(this.profile, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 });
  }
}

/** Wait for "DevTools listening on ws://..." on the browser's stderr. */
function devToolsUrl(child: ChildProcess): Promise<string> {
  return new Promise((resolve, reject) => {
    let stderr = "";
    const timer = setTimeout(() => fail(new Error(`Chromium did not start within ${LAUNCH_TIMEOUT_MS / 1000} s:\n${stderr.slice(-2000)}`)), LAUNCH_TIMEOUT_MS);
    const fail = (err: Error) => {
      clearTimeout(timer);
      reject(err);
    };
    child.once("error", (err) => fail(new UserError(`Could not start Chromium: ${err.message}`, "Set NIMBLE_CHROMIUM to a working Chromium or Chrome binary.")));
    child.once("exit", (code, signal) => fail(new Error(`Chromium exited (${signal ?? `code ${code}`}) before it was ready:\n${stderr.slice(-2000)}`)));
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (chunk: string) => {
      stderr += chunk;
      const match = /DevTools listening on (ws:\/\/\S+)/.exec(stderr);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]!);
      }
    });
  });
}

/** End the browser's process group: politely, then SIGKILL if it lingers. */
async function stopProcess(child: ChildProcess): Promise<void> {
  const exited = child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : new Promise<void>((r) => child.once("exit", () => r()));
  const signal = (sig: NodeJS.Signals) => {
    for (const target of child.pid ? [-child.pid, child.pid] : []) {
      try {
        process.kill(target, sig);
      } catch {
        // Already gone.
      }
    }
  };
  if (child.exitCode === null && child.signalCode === null) signal("SIGTERM");
  const gone = await Promise.race([exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 3_000))]);
  // The wrapper script may be gone while helpers in its group linger: always sweep the group.
  signal("SIGKILL");
  if (!gone) await Promise.race([exited, new Promise((r) => setTimeout(r, 2_000))]);
  child.stderr?.destroy();
}

/** Run `use` with a launched browser, closing it (and removing its profile) however `use` ends. */
export async function withBrowser<T>(use: (browser: Browser) => Promise<T>, opts: { executable?: string } = {}): Promise<T> {
  const browser = await Browser.launch(opts);
  try {
    return await use(browser);
  } finally {
    await browser.close();
  }
}

/** A full-page PNG of an HTML file, `width` CSS pixels wide. Returns the image size. */
export async function screenshot(htmlPath: string, pngPath: string, opts: { width?: number; executable?: string } = {}): Promise<{ width: number; height: number }> {
  const width = opts.width ?? 1000;
  return withBrowser(async (browser) => {
    const page = await browser.newPage();
    await page.navigate(pathToFileURL(path.resolve(htmlPath)).href);
    const height = await page.fitToContent(width);
    await writeFile(pngPath, await page.screenshot());
    return { width, height };
  }, opts);
}
