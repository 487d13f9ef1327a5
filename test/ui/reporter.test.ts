import { PassThrough } from "node:stream";
import { describe, expect, it } from "vitest";
import { JsonReporter } from "../../src/ui/json.js";
import { PlainReporter } from "../../src/ui/plain.js";
import { createReporter, isCI, reporterKind } from "../../src/ui/reporter.js";

function stream(isTTY: boolean): NodeJS.WriteStream {
  const s = new PassThrough() as unknown as NodeJS.WriteStream;
  (s as { isTTY?: boolean }).isTTY = isTTY;
  return s;
}

describe("createReporter", () => {
  it("uses JSON lines for --json, whatever the stream", async () => {
    expect(await createReporter({ json: true, stream: stream(true), env: {} })).toBeInstanceOf(JsonReporter);
    expect(await createReporter({ json: true, stream: stream(false), env: { CI: "true" } })).toBeInstanceOf(JsonReporter);
  });

  it("uses plain lines when the stream is not a TTY", async () => {
    expect(await createReporter({ json: false, stream: stream(false), env: {} })).toBeInstanceOf(PlainReporter);
  });

  it("uses plain lines when CI is set, even on a TTY", async () => {
    expect(await createReporter({ json: false, stream: stream(true), env: { CI: "true" } })).toBeInstanceOf(PlainReporter);
    expect(await createReporter({ json: false, stream: stream(true), env: { CI: "1" } })).toBeInstanceOf(PlainReporter);
  });

  it("picks ink on a TTY outside CI", () => {
    expect(reporterKind({ json: false, stream: stream(true), env: {} })).toBe("ink");
    expect(reporterKind({ json: false, stream: stream(true), env: { CI: "false" } })).toBe("ink");
    expect(isCI({ CI: "" })).toBe(false);
  });

  it("writes plain lines to the given stream", async () => {
    const s = stream(false);
    const chunks: string[] = [];
    (s as unknown as PassThrough).on("data", (c: Buffer) => chunks.push(c.toString()));
    const r = await createReporter({ json: false, stream: s, env: {} });
    r.handle({ type: "status", message: "hello" });
    r.close();
    return new Promise<void>((resolve) =>
      setImmediate(() => {
        expect(chunks.join("")).toBe("hello\n");
        resolve();
      }),
    );
  });
});
