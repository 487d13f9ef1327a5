"""Entry point: `python -m nimble_worker`, driven by the provider over fd 3.

Waits for `init`, answers `ready`, then serves the provider's orders from a table
(docs/protocol.md, "Worker link"): the operations every strategy shares below, plus the
rounds of the strategy the config names (`Strategy.orders`). Exit codes: 0 after `stop`,
3 after sending `error`, 4 if the provider closed the link without `stop`.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .checkpoint import final_weight_parts, load_checkpoint, state_files
from .comm import LinkComm, StepAborted, Stop, TimedComm
from .config import ConfigError, JobConfig
from .handoff import load_mirror, mirror_state, sync_params, sync_state
from .limits import apply_limits
from .link import Link, LinkClosed, LinkError
from .pipeline.stage_replica import build_replica
from .replica import Replica
from .shared import SharedBuffer
from .strategies import STRATEGIES, Strategy, build_strategy
from .task import Task, TaskError

Reply = Optional[tuple[dict, bytes]]
"""A reply to the provider (header, payload), or None."""


@dataclass(frozen=True)
class Op:
    handle: Callable[["Worker", dict, bytearray], Reply]
    """Serves one order; returns the reply (header, payload), or None for no reply."""


class Worker:
    def __init__(self, link: Link):
        self.link = link
        self.comm = LinkComm(link, 1, self.set_speed)
        self.comm.on_decision = self.apply
        self._replica: Replica | None = None
        self._strategy: Strategy | None = None

    @property
    def replica(self) -> Replica:
        assert self._replica is not None, "init first"
        return self._replica

    @property
    def strategy(self) -> Strategy:
        assert self._strategy is not None, "init first"
        return self._strategy

    def serve(self) -> None:
        header, _ = self.link.recv()
        if header["op"] == "stop":
            raise Stop()
        if header["op"] != "init":
            raise LinkError(f"expected init, got {header['op']}")
        self.init(header)
        while True:
            h, payload = self.comm.next_order()
            op = SHARED_OPS.get(h["op"]) or (ROUND if h["op"] in self.strategy.orders else None)
            if op is None:
                raise LinkError(f"unexpected op {h['op']!r}")
            decision = h.get("decision")
            if decision is not None:  # the last round's decision rides on this order
                self.apply(decision)
            if op is ROUND and int(h.get("attempt") or 0) < self.comm.live_from:
                continue  # ordered ahead of a round that was then aborted: aborted with it
            reply = op.handle(self, h, payload)
            self.comm.flush()  # no acknowledgement of this op's sends may trail its reply
            if reply is not None:
                self.link.send(*reply)

    def init(self, h: dict) -> None:
        # A warm spare was started before its job: the job's own variables arrive here.
        env = h.get("env") or {}
        if not isinstance(env, dict):
            raise LinkError(f"init: bad env {env!r}")
        os.environ.update({str(k): str(v) for k, v in env.items()})
        apply_limits(h.get("limits"), str(h.get("device") or "cpu"))
        torch.set_num_threads(max(1, int(h.get("threads") or 1)))
        cfg = JobConfig.from_dict(h["config"])
        task = Task(h["task_path"], cfg.task_args, h.get("package_dir"), h.get("site_dirs") or ())
        self.comm.world_size = int(h["world_size"])
        self.comm.round_ops = frozenset(STRATEGIES[cfg.strategy.name].orders) if cfg.strategy.name in STRATEGIES else frozenset()
        if h.get("shared_fd") is not None:  # all-reduces go through memory shared with the provider
            self.comm.shared = SharedBuffer(int(h["shared_fd"]))
        self._replica = build_replica(cfg, task, int(h["rank"]), int(h["world_size"]),
                                      str(h.get("device") or "cpu"), pipeline=h.get("pipeline"),
                                      max_micro_batch=h.get("max_micro_batch"),
                                      speed=1.0 if h.get("speed") is None else h["speed"])
        self._strategy = build_strategy(cfg, self._replica, TimedComm(self.comm))
        self.link.send({"op": "ready", **self._replica.describe()})

    def apply(self, decision) -> None:
        """The one place a round's decision is applied (docs/protocol.md, "Two-phase rounds")."""
        if not isinstance(decision, dict) or not isinstance(decision.get("step"), int):
            raise LinkError(f"bad decision {decision!r}")
        self.strategy.decide(decision["step"], decision.get("verdict"))

    def require_decided(self, op: str) -> None:
        """Orders that read the replica come after its round's decision: a coordinator that
        forgot to send one would otherwise evaluate or save an undecided state."""
        if self.strategy.pending is not None:
            raise LinkError(f"{op} while step {self.strategy.pending} awaits its decision")

    def decided(self, step: int, verdict: str) -> tuple[dict, bytes]:
        return {"op": "decided", "step": step, "verdict": verdict,
                "next_step": self.replica.next_step, "hash": self.strategy.shared_hash()}, b""

    # ---- the orders every strategy shares (SHARED_OPS) ------------------------------
    def set_speed(self, h: dict, _: bytearray = bytearray()) -> Reply:
        if self._replica is None:
            raise LinkError("set_speed before init")
        self._replica.speed.set(h.get("speed"))
        return None

    def stop(self, h: dict, _: bytearray) -> Reply:
        raise Stop()

    def ring(self, h: dict, _: bytearray) -> Reply:
        # The ring re-formed without some ranks: all-gathers now return this many blobs.
        size = h.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise LinkError(f"ring: bad size {size!r}")
        self.comm.world_size = size
        return None

    def sync(self, h: dict, _: bytearray) -> Reply:
        if self.strategy.name == "pipeline":  # stages differ: every layout starts from the seeded init
            raise LinkError("sync under pipeline parallelism: its stages are not replicas of one model")
        source = int(h.get("source") or 0)
        # A source no rank holds would zero every weight: refuse it.
        if not 0 <= source < self.replica.world_size:
            raise LinkError(f"sync: source rank {source} is not a rank of this job (world size {self.replica.world_size})")
        digest = sync_params(self.replica, self.comm, source)
        return {"op": "synced", "hash": digest}, b""

    def sync_state(self, h: dict, _: bytearray) -> Reply:
        # A member joined: every member takes rank `source`'s whole training state.
        self.require_decided("sync_state")
        digest = sync_state(self.replica, self.strategy, self.strategy.handoff_comm(self.comm),
                            int(h["source"]))
        return {"op": "synced_state", "step": self.replica.next_step, "hash": digest}, b""

    def mirror(self, h: dict, _: bytearray) -> Reply:
        # Pipeline: this stage's state, kept by a peer's provider until the next checkpoint.
        self.require_decided("mirror")
        size = mirror_state(self.replica, self.strategy, self.comm, int(h["to"]), str(h["tag"]))
        return {"op": "mirrored", "step": self.replica.next_step, "bytes": size}, b""

    def load_mirror(self, h: dict, _: bytearray) -> Reply:
        # Pipeline: a replacement takes its stage's state from the peer that kept it.
        step = load_mirror(self.replica, self.strategy, self.comm, int(h["from"]), str(h["tag"]))
        return {"op": "loaded", "step": step}, b""

    def decide(self, h: dict, _: bytearray) -> Reply:
        # A decision alone: at the end of a job, before recovery, or an abort mid-round.
        if h.get("verdict") == "abort":
            self.comm.aborted(h)
        self.apply(h)
        if h.get("quiet") is True:
            return None
        return self.decided(int(h["step"]), h["verdict"])

    def eval(self, h: dict, _: bytearray) -> Reply:
        self.require_decided("eval")
        with self.strategy.evaluation_params():  # e.g. DiLoCo's global parameters
            count, sums, counts = self.strategy.evaluate(int(h["start"]), int(h["count"]),
                                                         int(h["batch_size"]), h)
        return {"op": "eval_done", "step": h["step"], "count": count, "sums": sums, "counts": counts}, b""

    def state(self, h: dict, _: bytearray) -> Reply:
        self.require_decided("state")
        if h["kind"] == "final":
            # Sent straight from the parameters, while they are the ones evaluated (DiLoCo's
            # global ones): no copy of the weights is made.
            with self.strategy.evaluation_params():
                parts = final_weight_parts(self.replica)
                self.comm.flush()
                self.link.send({"op": "state", "kind": "final", "step": self.replica.next_step,
                                "files": [{"name": "model.safetensors",
                                           "size": sum(len(memoryview(p).cast("B")) for p in parts)}]},
                               parts)
            return None
        files = state_files(self.replica, self.strategy, h["kind"])
        return ({"op": "state", "kind": h["kind"], "step": self.replica.next_step,
                 "files": [{"name": n, "size": len(b)} for n, b in files]},
                [b for _, b in files])  # sent part after part: no joined copy of the state

    def load_state(self, h: dict, payload: bytearray) -> Reply:
        step = load_checkpoint(self.replica, self.strategy, split_files(h, payload))
        return {"op": "loaded", "step": step}, b""

    # ---- the strategy's rounds (Strategy.orders) ------------------------------------
    def round(self, h: dict, _: bytearray) -> Reply:
        self.comm.attempt = int(h.get("attempt") or 0)
        try:
            report = self.strategy.prepare(h)
            self.comm.flush()  # its sends are on their way before its report
        except StepAborted as aborted:  # an abort decision arrived instead of a collective's result
            step = int(h["step"]) if aborted.step is None else aborted.step
            if step != int(h["step"]):
                self.strategy.decide(step, "abort")  # the step applied ahead, and this one with it
            return self.decided(step, "abort")
        return {"op": self.strategy.orders[h["op"]], **report}, b""


SHARED_OPS: dict[str, Op] = {
    "stop": Op(Worker.stop),
    "set_speed": Op(Worker.set_speed),
    "ring": Op(Worker.ring),
    "sync": Op(Worker.sync),
    "sync_state": Op(Worker.sync_state),
    "decide": Op(Worker.decide),
    "mirror": Op(Worker.mirror),
    "load_mirror": Op(Worker.load_mirror),
    "eval": Op(Worker.eval),
    "state": Op(Worker.state),
    "load_state": Op(Worker.load_state),
}
ROUND = Op(Worker.round)


def served_ops() -> dict[str, list[str]]:
    """Every order a worker serves after `init`, by who serves it (checked against the
    TypeScript schema of worker operations by test/protocol/workerOps.test.ts)."""
    return {"shared": sorted(SHARED_OPS),
            **{name: sorted(cls.orders) for name, cls in STRATEGIES.items()}}


def split_files(h: dict, payload: bytes) -> dict[str, bytes]:
    files, offset = {}, 0
    for f in h.get("files") or []:
        size = int(f["size"])
        if size < 0 or offset + size > len(payload):
            raise LinkError(f"load_state: file {f.get('name')} overruns the payload")
        files[str(f["name"])] = payload[offset:offset + size]
        offset += size
    if offset != len(payload):
        raise LinkError(f"load_state: files cover {offset} bytes, payload has {len(payload)}")
    return files


def _error(link: Link, message: str, where: str, kind: str, **extra) -> None:
    # The provider reports it as `failed`: printed on stderr (a log line) only when it cannot be.
    try:
        link.send({"op": "error", "message": message, "where": where, "kind": kind, **extra})
    except OSError:
        print(f"nimble_worker: {kind} error at {where}: {message}", file=sys.stderr, flush=True)


def warm_up() -> None:
    """What every job's start would otherwise wait for, done before `init` (a warm spare does
    it before its job comes): torch.optim's first optimizer imports torch._dynamo (over a
    second here), and the first backward starts autograd. No random numbers are drawn."""
    w = torch.zeros(4, requires_grad=True)
    for make in (torch.optim.SGD, torch.optim.Adam):
        opt = make([w], lr=0.1)
        (w * 2).sum().backward()
        opt.step()


def main() -> int:
    link = Link(socket.socket(fileno=3))
    worker = Worker(link)
    try:
        warm_up()
        if os.environ.get("NIMBLE_ANNOUNCE_START") == "1":
            # torch is imported: the provider learns that this worker (maybe a warm spare) is ready for `init`.
            link.send({"op": "started"})
        worker.serve()
    except Stop:
        return 0
    except LinkClosed:
        print("nimble_worker: provider closed the link without stop", file=sys.stderr)
        return 4
    except TaskError as e:
        _error(link, e.message, e.where, "task")
        return 3
    except ConfigError as e:
        _error(link, e.message, "config", "config", field=e.field)
        return 3
    except Exception as e:  # noqa: BLE001 - everything else is our bug or a bad message
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        summary = "".join(tb[-3:]).rstrip()
        _error(link, f"{type(e).__name__}: {e}\n{summary}", "nimble_worker", "internal")
        return 3
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
