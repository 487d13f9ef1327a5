import { describe, expect, it } from "vitest";
import { ConfigError, TaskFailed, UserError } from "../../src/errors.js";
import { layerProfileResult, MAX_PROFILE_LAYERS } from "../../src/runtime/layerProfile.js";

const layer = { name: "0", type: "Linear", params: 10, param_bytes: 40, activation_bytes: 64, saved_bytes: 32, forward_backward_s: 0.001 };
const ok = { ok: true, sequential: true, model: "Sequential (10 parameters)", micro_batch: 8, base_rss_bytes: 1_000_000, layers: [layer] };

describe("layerProfileResult", () => {
  it("takes the profile's last line", () => {
    expect(layerProfileResult(ok, 0, [])).toEqual(ok);
  });

  it("refuses numbers that are not finite counts, and a list past the bound", () => {
    for (const bad of [{ params: -1 }, { param_bytes: 1.5 }, { saved_bytes: null }, { forward_backward_s: -0.1 }, { activation_bytes: 2 ** 60 }]) {
      expect(() => layerProfileResult({ ...ok, layers: [{ ...layer, ...bad }] }, 0, ["Traceback", "boom"])).toThrow(/The layer profile failed \(exit 0\): Traceback\nboom/);
    }
    expect(() => layerProfileResult({ ...ok, micro_batch: 0 }, 0, [])).toThrow(UserError);
    expect(() => layerProfileResult({ ...ok, layers: Array(MAX_PROFILE_LAYERS + 1).fill(layer) }, 0, [])).toThrow(/layer profile failed/);
    expect(() => layerProfileResult(undefined, 1, ["killed"])).toThrow(/exit 1/);
  });

  it("maps the task's and the config's errors like the dry run", () => {
    const task = (() => {
      try {
        layerProfileResult({ ok: false, kind: "task", where: "task.py:3 in build_model", message: "NameError: x" }, 3, []);
      } catch (err) {
        return err;
      }
    })();
    expect(task).toBeInstanceOf(TaskFailed);
    expect((task as TaskFailed).exitCode).toBe(3);
    expect((task as TaskFailed).message).toBe("task.py:3 in build_model: NameError: x");
    expect(() => layerProfileResult({ ok: false, kind: "config", field: "parallel.micro_batches", message: "expected an integer >= 1" }, 2, [])).toThrow(ConfigError);
  });
});
