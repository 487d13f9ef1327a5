import { describe, expect, it } from "vitest";
import { ReportParts } from "../../../src/job/coordinator/answers.js";

const report = { op: "state", kind: "final", step: 2, files: [{ name: "model.safetensors", size: 6 }] };

describe("a report whose payload came in parts", () => {
  it("is taken once its parts add up, its payload in one buffer", () => {
    const parts = new ReportParts();
    expect(parts.take({ t: "report", rank: 1, bytes_sent: 9, report, payload_bytes: 6 }, "p")).toBeNull();
    expect(parts.take({ t: "log", line: "between the parts" }, "p")).toEqual({ t: "log", line: "between the parts" });
    expect(parts.take({ t: "report_part", rank: 1, payload: new Uint8Array([1, 2, 3, 4]) }, "p")).toBeNull();
    const whole = parts.take({ t: "report_part", rank: 1, payload: new Uint8Array([5, 6]) }, "p");
    expect(whole).toEqual({ t: "report", rank: 1, bytes_sent: 9, report, payload: new Uint8Array([1, 2, 3, 4, 5, 6]) });
    // Plain reports pass as they are.
    const plain = { t: "report", rank: 0, bytes_sent: 0, report: { op: "loaded", step: 2 } } as const;
    expect(parts.take(plain, "p")).toBe(plain);
  });

  it("refuses parts nobody announced, beyond what was announced, or a report before them", () => {
    const parts = new ReportParts();
    expect(() => parts.take({ t: "report_part", rank: 0, payload: new Uint8Array(1) }, "provider x")).toThrow(/report part of rank 0 with no report announcing it/);
    parts.take({ t: "report", rank: 0, bytes_sent: 0, report, payload_bytes: 2 }, "provider x");
    expect(() => parts.take({ t: "report_part", rank: 0, payload: new Uint8Array(3) }, "provider x")).toThrow(/beyond the 2 bytes announced/);
    expect(() => parts.take({ t: "report", rank: 0, bytes_sent: 0, report: { op: "loaded", step: 1 } }, "provider x")).toThrow(/before the parts of its last one/);
    expect(() => new ReportParts().take({ t: "report", rank: 0, bytes_sent: 0, report, payload: new Uint8Array(1), payload_bytes: 1 }, "provider x")).toThrow(/both a payload and payload_bytes/);
  });
});
