// Network namespaces for the WAN benchmark: one namespace per host, all joined by veth pairs
// to a bridge in a router namespace of their own, each host's upload shaped with tc tbf.
// Nothing is routed to or from the root namespace: traffic stays between namespaces we made.
import { execFileSync } from "node:child_process";

/**
 * Every namespace a WAN makes starts with its prefix (default "nwan-"), so that what a killed
 * run left can be found and removed, and two WANs with different prefixes can coexist.
 */
export const PREFIX = "nwan-";
const router = (prefix) => `${prefix}router`;
const BRIDGE = "br0";
const IFNAME = "wan0";

/**
 * The hosts of a WAN: `names` (e.g. ["c", "p0", "p1"]) become namespaces `nwan-c`... with
 * addresses 10.77.0.(10+i) on interface wan0.
 */
export function wanHosts(names, prefix = PREFIX) {
  if (names.length > 200) throw new RangeError("at most 200 hosts");
  return names.map((name, i) => {
    if (!/^[a-z0-9]{1,8}$/.test(name)) throw new RangeError(`host name "${name}": use 1-8 lowercase letters or digits`);
    return { name, netns: `${prefix}${name}`, ip: `10.77.0.${10 + i}`, ifname: IFNAME, peer: `v-${name}` };
  });
}

/** The `ip` commands (argument arrays) that build the WAN for `hosts` from nothing. */
export function setupCommands(hosts, prefix = PREFIX) {
  const ROUTER = router(prefix);
  const cmds = [
    ["ip", "netns", "add", ROUTER],
    ["ip", "-n", ROUTER, "link", "set", "lo", "up"],
    ["ip", "-n", ROUTER, "link", "add", BRIDGE, "type", "bridge"],
    ["ip", "-n", ROUTER, "link", "set", BRIDGE, "up"],
  ];
  for (const h of hosts) {
    cmds.push(
      ["ip", "netns", "add", h.netns],
      ["ip", "-n", h.netns, "link", "set", "lo", "up"],
      ["ip", "link", "add", h.ifname, "netns", h.netns, "type", "veth", "peer", "name", h.peer, "netns", ROUTER],
      ["ip", "-n", h.netns, "addr", "add", `${h.ip}/24`, "dev", h.ifname],
      ["ip", "-n", h.netns, "link", "set", h.ifname, "up"],
      ["ip", "-n", ROUTER, "link", "set", h.peer, "master", BRIDGE],
      ["ip", "-n", ROUTER, "link", "set", h.peer, "up"],
    );
  }
  return cmds;
}

/**
 * tc tbf for a host's upload at `bitsPerS`. The bucket holds 1 ms of traffic (at least 16 KiB:
 * tbf splits larger GSO segments), so short transfers cannot beat the rate by much; the queue
 * holds 50 ms more, enough for TCP to keep the link busy without a long standing queue.
 */
export function shapeCommand(host, bitsPerS) {
  if (!(bitsPerS > 0)) throw new RangeError(`rate must be positive, got ${bitsPerS}`);
  const bytesPerS = bitsPerS / 8;
  const burst = Math.max(16 * 1024, Math.round(bytesPerS * 0.001));
  const limit = burst + Math.max(64 * 1024, Math.round(bytesPerS * 0.05));
  return ["ip", "netns", "exec", host.netns, "tc", "qdisc", "replace", "dev", host.ifname, "root", "tbf", "rate", `${Math.round(bitsPerS)}bit`, "burst", String(burst), "limit", String(limit)];
}

function run(cmd) {
  execFileSync(cmd[0], cmd.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
}

/** Namespaces this module made that still exist (a run that was killed leaves them). */
export function leftoverNamespaces(prefix = PREFIX) {
  let out = "";
  try {
    out = execFileSync("ip", ["netns", "list"], { encoding: "utf8" });
  } catch {
    return [];
  }
  return out
    .split("\n")
    .map((l) => l.trim().split(/\s+/)[0])
    .filter((n) => n && n.startsWith(prefix));
}

/** Remove every namespace this module made (their veths go with them). */
export function removeAll(prefix = PREFIX) {
  for (const ns of leftoverNamespaces(prefix)) {
    try {
      run(["ip", "netns", "del", ns]);
    } catch {
      // already gone
    }
  }
}

/** Can this process make namespaces? (root with iproute2 and tc.) Returns why not, or null. */
export function cannotMakeNamespaces() {
  if (typeof process.getuid === "function" && process.getuid() !== 0) return "not running as root";
  for (const tool of ["ip", "tc"]) {
    try {
      execFileSync(tool, ["-V"], { stdio: "ignore" });
    } catch {
      return `${tool} (iproute2) is not installed`;
    }
  }
  const probe = `${PREFIX}probe-${process.pid}`;
  try {
    run(["ip", "netns", "add", probe]);
    run(["ip", "netns", "del", probe]);
  } catch (err) {
    return `ip netns add failed: ${String(err.stderr ?? err.message).trim()}`;
  }
  return null;
}

/**
 * Build the WAN. Removes what an interrupted earlier run left, and removes everything again
 * when this process exits or is interrupted. Returns the hosts with helpers.
 */
export function makeWan(names, { prefix = PREFIX } = {}) {
  removeAll(prefix);
  const hosts = wanHosts(names, prefix);
  const cleanup = () => removeAll(prefix);
  process.once("exit", cleanup);
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
    process.once(sig, () => {
      cleanup();
      process.exit(128 + ({ SIGINT: 2, SIGTERM: 15, SIGHUP: 1 }[sig]));
    });
  }
  try {
    for (const cmd of setupCommands(hosts, prefix)) run(cmd);
  } catch (err) {
    cleanup();
    throw new Error(`building the WAN failed: ${String(err.stderr ?? err.message).trim()}`);
  }
  return {
    hosts,
    /** Shape every named host's upload to `bitsPerS`. */
    shape(bitsPerS, which = hosts) {
      for (const h of which) run(shapeCommand(h, bitsPerS));
    },
    /** Bytes a host has sent on its WAN interface so far (from the kernel's counters). */
    txBytes(host) {
      const out = execFileSync("ip", ["-j", "-s", "-n", host.netns, "link", "show", "dev", host.ifname], { encoding: "utf8" });
      return Number(JSON.parse(out)[0].stats64.tx.bytes);
    },
    /** The argv prefix that runs a command inside a host's namespace. */
    exec(host) {
      return ["ip", "netns", "exec", host.netns];
    },
    close: cleanup,
  };
}
