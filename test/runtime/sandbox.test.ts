import { describe, expect, it } from "vitest";
import { bwrapArgs, detectSandbox, gpuDeviceNodes, SANDBOX_UID } from "../../src/runtime/sandbox.js";

describe("a worker's sandbox", () => {
  const args = bwrapArgs(
    { readOnly: ["/opt/env", "/opt/env/lib", "/usr/lib/python3"], jobDir: "/tmp/nimble-job-x", env: { PATH: "/usr/bin", NIMBLE_RANK: "0" }, devices: gpuDeviceNodes(["cuda:1"]) },
    ["/opt/env/bin/python", "-m", "nimble_worker"],
  );
  const pairs = (flag: string) => args.flatMap((a, i) => (a === flag ? [args[i + 1]] : []));

  it("makes every namespace, an unprivileged uid and no capabilities", () => {
    expect(args.slice(0, 10)).toEqual(["--unshare-all", "--uid", String(SANDBOX_UID), "--gid", String(SANDBOX_UID), "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--ro-bind"]);
    expect(args).not.toContain("--share-net");
  });

  it("shows the environment read-only (once, inside folders not repeated), the job folder writable, a private /tmp, and no home", () => {
    expect(pairs("--ro-bind")).toContain("/opt/env");
    expect(pairs("--ro-bind")).not.toContain("/opt/env/lib");
    expect(pairs("--ro-bind")).not.toContain("/usr/lib/python3"); // inside /usr, bound anyway
    expect(pairs("--bind")).toEqual(["/tmp/nimble-job-x"]);
    expect(pairs("--tmpfs")).toEqual(["/tmp"]);
    expect(args.indexOf("--tmpfs")).toBeLessThan(args.indexOf("--bind")); // the job folder on top of the private /tmp
    expect(args.some((a) => a === "/home" || a === "/root" || a.startsWith("/home/"))).toBe(false);
    expect(pairs("--chdir")).toEqual(["/tmp/nimble-job-x"]);
  });

  it("clears the environment and sets only the worker's variables", () => {
    expect(args).toContain("--clearenv");
    expect(args.indexOf("--clearenv")).toBeLessThan(args.indexOf("--setenv"));
    expect(pairs("--setenv")).toEqual(["PATH", "NIMBLE_RANK"]);
    expect(args.slice(args.indexOf("--") + 1)).toEqual(["/opt/env/bin/python", "-m", "nimble_worker"]);
  });

  it("binds only the assigned GPU's device node with the driver's shared ones", () => {
    expect(pairs("--dev-bind-try")).toEqual(["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset", "/dev/nvidia1"]);
    expect(gpuDeviceNodes(["cpu"])).toEqual([]);
  });

  it("says why when bubblewrap is missing", async () => {
    expect(await detectSandbox({ NIMBLE_BWRAP: "/nonexistent/bwrap" })).toEqual({ kind: "none", reason: "bubblewrap (/nonexistent/bwrap) is not installed (apt install bubblewrap)" });
  });
});
