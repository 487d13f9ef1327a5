"""Small tensor helpers shared by the replica, the strategies and the compressors."""

from __future__ import annotations

import hashlib
import io
from typing import Any, Sequence

import torch


def flat_cpu(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat float32 CPU tensor of `tensors` in order (what an all-reduce carries)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


def unflat(buf: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`buf` cut back into tensors shaped (and placed) like `like` (dtype kept float32)."""
    out, at = [], 0
    for t in like:
        out.append(buf[at:at + t.numel()].view(t.shape).to(t.device))
        at += t.numel()
    return out


def params_hash(params: Sequence[torch.Tensor]) -> str:
    """sha256 of the float32 bytes of every tensor, in order: equal replicas, equal hash."""
    h = hashlib.sha256()
    for p in params:
        # The array's own buffer (no bytes copy: a stage near its memory limit hashes too).
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy())
    return h.hexdigest()


def to_device(batch: Any, device: torch.device) -> Any:
    """A collated batch (tensors in dicts, lists, tuples and named tuples) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        items = [to_device(v, device) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def save_bytes(obj: Any) -> memoryview:
    """torch.save into memory; the buffer itself, not a copy of it (checkpoints of a stage
    near its memory limit would otherwise hold the state three times)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer()


def load_bytes(data: bytes, device: torch.device | str = "cpu") -> Any:
    """torch.load of bytes that came from a peer or a file: tensors and plain data only."""
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
