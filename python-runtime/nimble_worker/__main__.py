"""Entry point: `python -m nimble_worker`, driven by the provider over fd 3.

Waits for `init`, answers `ready`, then serves sync / step / eval / state /
load_state / set_speed / stop (docs/protocol.md, "Worker link"). Exit codes: 0 after `stop`,
3 after sending `error`, 4 if the provider closed the link without `stop`.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch

from .compress import ConfigError
from .config import JobConfig
from .link import Link, LinkClosed, LinkError
from .task import Task, TaskError
from .train import StepAborted, Trainer


class Stop(Exception):
    """The provider sent `stop`."""


# Messages that imply the coordinator saw the prepared step reduced on every member.
COMMITTING_OPS = frozenset({"step", "sync", "sync_state", "commit", "eval", "state"})


class Worker:
    def __init__(self, link: Link):
        self.link = link
        self.trainer: Trainer | None = None
        self.next_id = 0
        # The provider's number for the step attempt now running: collectives carry it, so
        # that requests of an abandoned attempt are never served on a re-formed ring.
        self.attempt = 0

    # ---- the Comm the trainer and its compressor use (nimble_worker/compress) --------
    world_size = 1

    def _reply(self, op: str, rid: int) -> tuple[dict, bytearray]:
        header, payload = self.link.recv()
        while header["op"] == "set_speed":  # may arrive at any time; no reply
            self.set_speed(header)
            header, payload = self.link.recv()
        if header["op"] == "stop":
            raise Stop()
        if header["op"] == "abort":  # a ring member was lost: this step is abandoned
            raise StepAborted()
        if header["op"] != op or header.get("id") != rid:
            raise LinkError(f"expected {op} {rid}, got {header['op']} id={header.get('id')}")
        return header, payload

    def allreduce(self, buf: torch.Tensor, codec: str = "f32") -> torch.Tensor:
        rid, count = self.next_id, buf.numel()
        self.next_id += 1
        # The tensor's own memory goes to the socket (no bytes copy of the gradient).
        self.link.send({"op": "allreduce", "id": rid, "dtype": "float32", "count": count,
                        "codec": codec, "attempt": self.attempt},
                       buf.detach().contiguous().numpy())
        header, payload = self._reply("allreduce_result", rid)
        if header.get("dtype") != "float32" or header.get("count") != count \
                or header.get("codec", codec) != codec or len(payload) != 4 * count:
            raise LinkError(f"allreduce_result {rid}: expected {count} float32 "
                            f"({4 * count} bytes), got dtype={header.get('dtype')} "
                            f"count={header.get('count')} codec={header.get('codec')} and {len(payload)} bytes")
        if count == 0:
            return torch.zeros(0, dtype=torch.float32)
        return torch.frombuffer(payload, dtype=torch.float32)  # payload: ours, writable

    def allgather(self, blob: bytes) -> list[bytes]:
        rid = self.next_id
        self.next_id += 1
        self.link.send({"op": "allgather", "id": rid, "size": len(blob),
                        "attempt": self.attempt}, blob)
        header, payload = self._reply("allgather_result", rid)
        sizes = header.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != self.world_size \
                or not all(isinstance(s, int) and s >= 0 for s in sizes) \
                or sum(sizes) != len(payload):
            raise LinkError(f"allgather_result {rid}: sizes {sizes!r} do not split "
                            f"{len(payload)} bytes between {self.world_size} workers")
        out, at = [], 0
        for s in sizes:
            out.append(payload[at:at + s])
            at += s
        return out

    def init(self, h: dict) -> None:
        torch.set_num_threads(max(1, int(h.get("threads") or 1)))
        cfg = JobConfig.from_dict(h["config"])
        task = Task(h["task_path"], cfg.task_args)
        self.world_size = int(h["world_size"])
        self.trainer = Trainer(cfg, task, int(h["rank"]), int(h["world_size"]),
                               str(h.get("device") or "cpu"), self,
                               max_micro_batch=h.get("max_micro_batch"),
                               speed=1.0 if h.get("speed") is None else h["speed"])
        self.link.send({"op": "ready", **self.trainer.describe()})

    def set_speed(self, h: dict) -> None:
        if self.trainer is None:
            raise LinkError("set_speed before init")
        self.trainer.set_speed(h.get("speed"))  # type: ignore[arg-type]

    def serve(self) -> None:
        header, _ = self.link.recv()
        if header["op"] == "stop":
            raise Stop()
        if header["op"] != "init":
            raise LinkError(f"expected init, got {header['op']}")
        self.init(header)
        tr = self.trainer
        assert tr is not None
        while True:
            h, payload = self.link.recv()
            op = h["op"]
            # The coordinator sends these only once every member reduced the prepared
            # step: apply its update first (docs/protocol.md, "Two-phase steps").
            if op in COMMITTING_OPS:
                tr.commit()
            if op == "stop":
                raise Stop()
            elif op == "set_speed":
                self.set_speed(h)
            elif op == "sync":
                self.link.send({"op": "synced", "hash": tr.sync(int(h.get("source") or 0))})
            elif op == "sync_state":
                # A member joined: every member takes rank `source`'s whole training state.
                digest = tr.sync_state(int(h["source"]))
                self.link.send({"op": "synced_state", "step": tr.next_step, "hash": digest})
            elif op == "ring":
                # The ring re-formed without some ranks: all-gathers now return this many blobs.
                size = h.get("size")
                if not isinstance(size, int) or size < 1:
                    raise LinkError(f"ring: bad size {size!r}")
                self.world_size = size
            elif op == "step":
                t = int(h["step"])
                self.attempt = int(h.get("attempt") or 0)
                try:
                    report = tr.prepare(t, [int(s) for s in h["shares"]], bool(h.get("want_hash")))
                except StepAborted:
                    self.link.send({"op": "aborted", "step": t})
                    continue
                self.link.send({"op": "step_done", **report})
            elif op == "abort":
                # The coordinator abandons the step this worker already reduced (others had not).
                dropped = tr.abort()
                self.link.send({"op": "aborted", "step": tr.next_step if dropped is None else dropped})
            elif op == "commit":
                self.link.send({"op": "committed", "step": tr.next_step, "hash": tr.hash()})
            elif op == "eval":
                count, sums = tr.eval(int(h["start"]), int(h["count"]), int(h["batch_size"]))
                self.link.send({"op": "eval_done", "step": h["step"], "count": count,
                                "sums": sums})
            elif op == "state":
                files = tr.state(h["kind"])
                self.link.send({"op": "state", "kind": h["kind"], "step": tr.next_step,
                                "files": [{"name": n, "size": len(b)} for n, b in files]},
                               b"".join(b for _, b in files))
            elif op == "load_state":
                tr.abort()  # nothing prepared survives a restore
                self.link.send({"op": "loaded", "step": tr.load_state(split_files(h, payload))})
            else:
                raise LinkError(f"unexpected op {op!r}")


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
    print(f"nimble_worker: {kind} error at {where}: {message}", file=sys.stderr, flush=True)
    try:
        link.send({"op": "error", "message": message, "where": where, "kind": kind, **extra})
    except OSError:
        pass


def main() -> int:
    link = Link(socket.socket(fileno=3))
    worker = Worker(link)
    try:
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
