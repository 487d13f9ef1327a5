"""Training strategies, chosen by the config key `strategy: {name: ...}`: sync (the
default) or diloco; pipeline whenever the config has `parallel` (the coordinator refuses
diloco with it)."""

from __future__ import annotations

from ..comm import TimedComm
from ..config import ConfigError, JobConfig
from ..replica import Replica
from .base import Strategy
from .diloco import DiLoCo
from .pipeline import Pipeline
from .sync import Sync

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Sync, DiLoCo, Pipeline)}


def build_strategy(cfg: JobConfig, replica: Replica, comm: TimedComm) -> Strategy:
    if cfg.parallel is not None:
        return Pipeline(cfg, replica, comm)
    kind = STRATEGIES.get(cfg.strategy.name)
    if kind is None:
        raise ConfigError("strategy.name", f"strategy.name {cfg.strategy.name!r} is not one of "
                                           f"{', '.join(STRATEGIES)}")
    return kind(cfg, replica, comm)
