"""Checkpoints and state hand-offs, composed of the replica's, the strategy's and the
compressor's state.

A checkpoint is a step folder of named files (docs/protocol.md, "Checkpoint files"):
the replica's model.pt, optimizer.pt, schedule.pt and data.json; rng.pt; meta.json; the
compressor's compressor.pt (per worker: its error-feedback memories are this rank's);
and strategy.pt, only for a strategy that has state of its own. Checkpoints without
compressor.pt or strategy.pt (older ones) load with fresh state for those parts.

A state blob is what a replica joining mid-run takes from a peer over one all-gather:
the same parts in one torch.save, without the per-worker memories.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict
from typing import Any

import torch

from . import safetensors
from .replica import Replica
from .strategies import Strategy
from .tensors import load_bytes, save_bytes

REPLICA_FILES = {"model.pt": "model", "optimizer.pt": "optimizer", "schedule.pt": "schedule"}
REQUIRED_FILES = (*REPLICA_FILES, "data.json", "rng.pt", "meta.json")
OPTIONAL_FILES = ("compressor.pt", "strategy.pt")
KINDS = ("checkpoint", "final", "compressor")


def compressor_file(replica: Replica, strategy: Strategy) -> tuple[str, bytes]:
    state = strategy.compressor.state_dict() if strategy.compressor is not None else {}
    return ("compressor.pt", save_bytes({"rank": replica.rank, "world_size": replica.world_size,
                                         "method": replica.cfg.compression.method,
                                         "state": state}))


def final_weights(replica: Replica) -> bytes:
    """The model's state as safetensors, as transformers and safetensors.torch expect it:
    `format: pt` metadata, and tied weights (tensors sharing storage) stored once, the
    others named in `tied` metadata. Tensors of dtypes safetensors lacks are named in
    `dropped` and in the worker's log, not left out silently."""
    return safetensors.joined(final_weight_parts(replica))


def final_weight_parts(replica: Replica) -> list:
    """final_weights as parts (its header, then each tensor's bytes, viewed in place where
    they can be: safetensors.dump_parts), valid while the parameters stay as they are."""
    tensors, tied, dropped, seen = {}, {}, [], {}
    for name, t in replica.weights_state_dict().items():
        if t.dtype not in safetensors.DTYPES:
            dropped.append(f"{name} ({t.dtype})")
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    meta = {"format": "pt", "step": str(replica.next_step), "name": replica.cfg.name,
            "model": replica.describe()["model"]}
    if tied:
        meta["tied"] = json.dumps(tied)
    if dropped:
        meta["dropped"] = ", ".join(dropped)
        print(f"nimble_worker: model.safetensors leaves out {', '.join(dropped)}: safetensors "
              "has no such dtype", file=sys.stderr, flush=True)
    return safetensors.dump_parts(tensors, meta)


def state_files(replica: Replica, strategy: Strategy, kind: str) -> list[tuple[str, bytes]]:
    """The files of `kind`: checkpoint, final (model.safetensors) or compressor (only
    compressor.pt: the rest of a checkpoint is the same on every worker)."""
    if kind == "final":
        with strategy.evaluation_params():  # e.g. DiLoCo's global parameters
            return [("model.safetensors", final_weights(replica))]
    if kind == "compressor":
        return [compressor_file(replica, strategy)]
    if kind != "checkpoint":
        raise ValueError(f"unknown state kind {kind!r} (one of {', '.join(KINDS)})")
    state = replica.state_dict()
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if replica.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(replica.device)
    meta = {"step": replica.next_step, "world_size": replica.world_size,
            "config": asdict(replica.cfg)}
    files = [(name, save_bytes(state[key])) for name, key in REPLICA_FILES.items()]
    data = {"step": replica.next_step}
    if replica.loss_scale.enabled:  # fp16: the loss scale every worker shares
        data["loss_scale"] = replica.loss_scale.state_dict()
    files += [("data.json", json.dumps(data).encode()),
              ("rng.pt", save_bytes(rng)),
              ("meta.json", json.dumps(meta).encode()),
              compressor_file(replica, strategy)]
    own = strategy.state_dict()
    if own:
        files.append(("strategy.pt", save_bytes({"name": strategy.name, "state": own})))
    return files


def load_checkpoint(replica: Replica, strategy: Strategy, files: dict[str, bytes]) -> int:
    """Restore a checkpoint's files; returns the next step. Drops any prepared round."""
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise ValueError(f"checkpoint is missing {', '.join(missing)}")
    strategy.abort()
    state = {key: load_bytes(files[name], replica.device) for name, key in REPLICA_FILES.items()}
    data = json.loads(files["data.json"])
    state["next_step"] = int(data["step"])
    state["loss_scale"] = data.get("loss_scale")
    replica.load_state_dict(state)
    if "compressor.pt" in files and strategy.compressor is not None:
        # Error-feedback memories are per worker; the coordinator checkpoints one
        # rank, so only that rank (in a run of the same size) gets its memories back.
        c = load_bytes(files["compressor.pt"])
        if c.get("method") == replica.cfg.compression.method:
            same = c.get("rank") == replica.rank and c.get("world_size") == replica.world_size
            strategy.compressor.load_state_dict(c["state"], same)
    saved = load_bytes(files["strategy.pt"], replica.device) if "strategy.pt" in files else None
    if saved is not None and saved.get("name") == strategy.name:
        strategy.load_state_dict(saved["state"])
    else:  # none saved, or a run resumed under another strategy: it starts its own afresh
        if saved is not None:
            print(f"nimble_worker: the checkpoint's strategy state is {saved.get('name')!r}'s; "
                  f"{strategy.name} starts its own afresh", file=sys.stderr, flush=True)
        strategy.load_state_dict({})  # as from a peer without any (load_state_blob)
    rng = load_bytes(files["rng.pt"])
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(_to_tuple(rng["python"]))
    if "cuda" in rng and replica.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), replica.device)
    return replica.next_step


def state_blob(replica: Replica, strategy: Strategy) -> bytes:
    """Everything a replica joining mid-run needs to continue exactly like this one:
    the replica's state, the strategy's, and the compressor's shared state (a joiner's
    error-feedback memory starts empty: it has not dropped anything yet)."""
    c = strategy.compressor
    # A compressor whose state_dict holds this rank's own state too says what to share.
    shared = {} if c is None else getattr(c, "shared_state_dict", c.state_dict)()
    blob = {**replica.state_dict(), "strategy": strategy.state_dict(), "compressor": shared}
    return save_bytes(blob)


def load_state_blob(replica: Replica, strategy: Strategy, blob: bytes) -> None:
    state = load_bytes(blob, replica.device)
    strategy.abort()
    replica.load_state_dict(state)
    strategy.load_state_dict(state.get("strategy") or {})
    if strategy.compressor is not None:
        strategy.compressor.load_state_dict(state["compressor"], same_worker=False)


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
