"""The replica of one pipeline stage: only that stage's layers, their optimizer and the
data (stage 0 and the last stage load the micro-batches; the middle ones nothing)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import JobConfig
from ..link import LinkError
from ..replica import Replica
from ..task import Task
from .split import StageModel, build_stage


class StageReplica(Replica):
    def __init__(self, cfg: JobConfig, task: Task, rank: int, world_size: int, device: str,
                 stage: int = 0, stages: int = 1, bounds: Sequence[int] | None = None,
                 max_micro_batch: int | None = None, speed: float = 1.0):
        self.stage, self.stages = stage, stages
        self.bounds = None if bounds is None else list(bounds)
        self.stage_model: StageModel | None = None
        super().__init__(cfg, task, rank, world_size, device, max_micro_batch, speed)
        self.prefetch = None  # a stage loads its micro-batches where it runs them
        self.clip_coef: torch.Tensor | None = None
        """The global gradient norm's clip coefficient for the next `apply` (Pipeline sets it)."""

    def _build_model(self) -> torch.nn.Module:
        self.stage_model = build_stage(self.task, self.cfg, self.stage, self.stages, self.bounds, self.device)
        return self.stage_model.module

    def _named_parameters(self):
        assert self.stage_model is not None
        return list(zip(self.stage_model.names, self.model.parameters()))

    def weights_state_dict(self) -> dict[str, torch.Tensor]:
        assert self.stage_model is not None
        names = self.stage_model.state_names
        return {names.get(k, k): v for k, v in self.model.state_dict(keep_vars=False).items()}

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def layers(self) -> list[int]:
        """[lo, hi): the global indices of the layers it holds (build_stages: [stage, stage+1])."""
        assert self.stage_model is not None
        held = self.stage_model.layers
        return [held[0], held[-1] + 1]

    def describe(self) -> dict:
        return {**super().describe(), "stage": self.stage, "layers": self.layers}

    def apply(self, step: int, grads: Sequence[torch.Tensor] | None, skipped: bool | None = None) -> None:
        """As Replica.apply, but the clip coefficient comes from the norm over every stage
        (`clip_coef`, computed the way torch.nn.utils.clip_grad_norm_ does). `skipped`: whether
        the step counts as skipped for the loss scale (default: grads is None; a worker that
        served no chain has no gradient but skips no more than the others)."""
        if grads is not None:
            unscale = 1.0 / self.loss_scale.value
            for p, g in zip(self.trainable, grads):
                p.grad = (g * unscale if unscale != 1.0 else g).to(p.device, p.dtype).view(p.shape)
            if self.cfg.grad_clip > 0 and self.clip_coef is not None:
                for p in self.trainable:
                    p.grad.mul_(self.clip_coef.to(p.grad.device))
            self.optimizer.step()
        self.clip_coef = None
        self.loss_scale.update(skipped=grads is None if skipped is None else skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.next_step = step + 1


def pipeline_header(h: dict | None, cfg: JobConfig) -> tuple[int, int, list[int] | None]:
    """(stage, stages, bounds) from init's `pipeline` header (absent: stage 0 of 1)."""
    if h is None:
        return 0, 1, None
    if not isinstance(h, dict):
        raise LinkError(f"init: pipeline must be an object, got {type(h).__name__}")
    stage, stages, bounds = h.get("stage"), h.get("stages"), h.get("bounds")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)
    if not is_int(stages) or stages < 1 or not is_int(stage) or not 0 <= stage < stages:
        raise LinkError(f"init: pipeline stage {stage!r} of {stages!r} stages")
    if bounds is not None and (not isinstance(bounds, list) or not all(is_int(b) for b in bounds)):
        raise LinkError(f"init: pipeline bounds {bounds!r} must be a list of integers or null")
    if cfg.parallel is not None and stages != cfg.parallel.pipeline_stages and stages != 1:
        raise LinkError(f"init: pipeline of {stages} stages, but parallel.pipeline_stages is "
                        f"{cfg.parallel.pipeline_stages}")
    return stage, stages, bounds


def build_replica(cfg: JobConfig, task: Task, rank: int, world_size: int, device: str,
                  pipeline: dict | None = None, max_micro_batch: int | None = None,
                  speed: float = 1.0) -> Replica:
    """A StageReplica when the config has `parallel` (init's `pipeline` header says which
    stage), else a Replica."""
    if cfg.parallel is None:
        return Replica(cfg, task, rank, world_size, device, max_micro_batch=max_micro_batch, speed=speed)
    stage, stages, bounds = pipeline_header(pipeline, cfg)
    return StageReplica(cfg, task, rank, world_size, device, stage, stages, bounds,
                        max_micro_batch=max_micro_batch, speed=speed)
