"""Mixed precision (`precision` in the job config): autocast on the worker's device, and
for fp16 a dynamic loss scale.

The scale is the same on every worker: it starts at 2^16, halves after a step skipped for
a non-finite gradient, and doubles after 2,000 steps in a row that were not. A step is
skipped on every worker at once (the compressors carry a poison mark through every
collective, so int8 and PowerSGD agree too), so the scales never drift apart.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GROWTH_INTERVAL = 2000


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class LossScale:
    def __init__(self, precision: str):
        self.enabled = precision == "fp16"
        self.value = 2.0 ** 16 if self.enabled else 1.0
        self.good = 0

    def update(self, skipped: bool) -> None:
        if not self.enabled:
            return
        if skipped:
            self.value, self.good = max(1.0, self.value / 2), 0
            return
        self.good += 1
        if self.good >= GROWTH_INTERVAL:
            self.value, self.good = self.value * 2, 0

    def state_dict(self) -> dict:
        return {"value": self.value, "good": self.good}

    def load_state_dict(self, state: dict | None) -> None:
        if self.enabled and state:
            self.value, self.good = float(state["value"]), int(state["good"])
