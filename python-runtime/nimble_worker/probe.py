"""`python -m nimble_worker.probe`: one JSON line describing Python, torch and devices."""

from __future__ import annotations

import json
import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def probe() -> dict:
    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"id": f"cuda:{i}", "kind": "cuda", "name": p.name,
                            "memory_bytes": int(p.total_memory)})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"id": "mps", "kind": "mps", "name": f"Apple {platform.machine()} GPU",
                        "memory_bytes": total_ram()})
    if not devices:
        devices.append({"id": "cpu", "kind": "cpu", "name": cpu_name(),
                        "memory_bytes": total_ram(), "cores": os.cpu_count() or 1})
    return {"python": platform.python_version(), "torch": torch.__version__, "devices": devices}


if __name__ == "__main__":
    print(json.dumps(probe()), flush=True)
