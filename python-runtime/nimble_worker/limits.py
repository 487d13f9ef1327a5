"""The owner's limits on this worker, set on itself before any task code runs.

RLIMIT_NPROC bounds its processes and threads (per real uid: it does not bind a provider
running as root, where a pids cgroup does) and RLIMIT_FSIZE the largest file it writes.
Both are lowered for good: the worker has no capability to raise them again. On a GPU,
torch's share of device memory is capped by the owner's --max-memory.
"""

from __future__ import annotations

import resource

import torch


def apply_limits(limits: dict | None, device: str) -> None:
    if not limits:
        return
    for which, value in ((resource.RLIMIT_NPROC, limits.get("max_processes")),
                         (resource.RLIMIT_FSIZE, limits.get("max_file_bytes"))):
        if value is None:
            continue
        soft, hard = resource.getrlimit(which)
        new = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        resource.setrlimit(which, (new, new))
    max_memory = limits.get("max_memory_bytes")
    if max_memory and device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory / total), index)
