"""Testing and benchmarking aids: simulated slowness for heterogeneous clusters on one host."""

from __future__ import annotations

import time
from typing import Callable

import torch


def check_speed(speed) -> float:
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) \
            or not (0.0 < float(speed) <= 1.0):
        raise ValueError(f"speed must be a number in (0, 1], got {speed!r}")
    return float(speed)


class SpeedAid:
    """After each forward/backward the worker sleeps (1/speed - 1) x its compute time, so
    one host can stand for a slower one. On a CPU device the compute time is CPU time, not
    wall: on a host shared with other workers, contention must not be multiplied into the
    simulated slowness. Nor is the prefetch thread's (`background_cpu`): it loads data on
    the host's CPU, which a slower device would not slow."""

    def __init__(self, speed: float, device: torch.device,
                 background_cpu: Callable[[], float] = lambda: 0.0):
        self.speed, self.device = check_speed(speed), device
        self.background_cpu = background_cpu
        """CPU seconds the worker's background threads have used so far."""
        self._wall0 = self._cpu0 = 0.0

    def set(self, speed) -> None:
        """Takes effect from the next forward/backward."""
        self.speed = check_speed(speed)

    def start(self) -> None:
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time() - self.background_cpu()

    def stretch(self) -> None:
        """Sleep for the simulated part of the work done since `start`."""
        if self.speed >= 1.0:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            work = time.perf_counter() - self._wall0
        else:
            work = max(0.0, time.process_time() - self.background_cpu() - self._cpu0)
        time.sleep((1.0 / self.speed - 1.0) * work)
