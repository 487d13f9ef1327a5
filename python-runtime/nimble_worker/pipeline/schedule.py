"""Pipeline schedules: the order of a stage's forwards and backwards over M micro-batches.

Pure functions, the same on every worker. `gpipe` runs every forward, then every
backward (Huang et al. 2019); `1f1b` runs S - stage - 1 forwards of warmup, then one
forward and one backward in turn, then the remaining backwards (PipeDream-Flush,
Narayanan et al. 2021): the same bubble, but at most min(S - stage, M) micro-batches'
activations alive at once instead of M.
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b")

Action = tuple[str, int]
"""("F" or "B", micro-batch index)."""


def actions(schedule: str, stage: int, stages: int, micro_batches: int) -> list[Action]:
    """The forwards ("F", mb) and backwards ("B", mb) that stage `stage` of `stages` runs,
    in order, for `micro_batches` micro-batches."""
    s, S, M = stage, stages, micro_batches
    if not 0 <= s < S:
        raise ValueError(f"stage {s} is not one of 0 .. {S - 1}")
    if M < 0:
        raise ValueError(f"micro_batches must be >= 0, got {M}")
    if schedule == "gpipe":
        return [("F", mb) for mb in range(M)] + [("B", mb) for mb in range(M)]
    if schedule != "1f1b":
        raise ValueError(f"unknown schedule {schedule!r} (one of {', '.join(SCHEDULES)})")
    warmup = min(S - s - 1, M)
    out: list[Action] = [("F", mb) for mb in range(warmup)]
    for i in range(M - warmup):  # steady state: one forward, one backward
        out += [("F", warmup + i), ("B", i)]
    out += [("B", mb) for mb in range(M - warmup, M)]  # cooldown
    return out


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The idle fraction of a step's pipeline time with equal stages: (S-1) / (M+S-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def micro_sizes(n: int, micro_batches: int) -> list[int]:
    """`n` samples in `micro_batches` contiguous micro-batches whose sizes differ by at most
    one, larger first. Empty ones (n < micro_batches) are left out, so every stage of a
    chain, computing this from the same share, runs the same micro-batches."""
    if n < 0 or micro_batches < 1:
        raise ValueError(f"cannot split {n} samples into {micro_batches} micro-batches")
    q, r = divmod(n, micro_batches)
    return [q + 1 if k < r else q for k in range(micro_batches) if q + (k < r) > 0]
