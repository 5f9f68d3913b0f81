"""Distilling a K-step Refiner (the teacher: an export) into a few-step student of the same shape
(docs/training.md#distilling-a-few-step-student).

Per batch, from the start point the teacher's sampler draws, x_start = up(preview) + start_noise * eps: the teacher's
K Euler steps (no grad) and the student's `steps` (with grad); loss mse(student, teacher) + gt_weight *
mse(student, target). For a 1-step student the second term is the bridge loss at t = 1 with the sampler's noise.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from surf_train import DATA_DIR
from surf_train.common.config import check
from surf_train.common.errors import ConfigError, known_keys
from surf_train.models.refiner import Refiner, RefinerConfig
from surf_train.models.sampler import RefinerFn, RefinerSampler
from surf_train.training.objective import BridgeConfig

log = logging.getLogger(__name__)

# RefinerConfig fields that change how a Refiner runs, not what it computes: a student may differ there
RUNTIME_FIELDS = ("grad_checkpointing", "attn_impl")


@dataclass
class DistillConfig:
    """module.distill: the teacher and the student's sampler."""

    teacher: str = (
        ""  # exported Refiner directory (or Hub id): its weights start the student, its surf.json its sampler
    )
    steps: int = 1  # the student's Euler steps K (the run's bridge.steps, so its export's)
    gt_weight: float = 0.0  # weight of mse(student output, target) beside mse(student output, teacher output)

    def __post_init__(self):
        check(self, "module.distill.")
        if not self.teacher:
            raise ConfigError("module.distill.teacher is empty: name an exported Refiner directory")
        if self.steps < 1:
            raise ConfigError(f"module.distill.steps={self.steps} must be >= 1")
        if self.gt_weight < 0:
            raise ConfigError(f"module.distill.gt_weight={self.gt_weight} must be >= 0")


@dataclass
class Teacher:
    """The frozen teacher (eval mode, no grad), the sampler its export records, and its surf.json."""

    net: Refiner
    sampler: RefinerSampler
    meta: dict

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights (names and bytes): checkpoints keep it, so a resume sees a teacher that changed."""
        h = hashlib.sha256()
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode())
            h.update(
                v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )  # any dtype, 0-d too
        return h.hexdigest()

    def student_bridge(self, steps: int) -> BridgeConfig:
        """The teacher's bridge record (surf.json) with the student's K: the student's validation and export sampler."""
        known = {f.name for f in dataclasses.fields(BridgeConfig)}
        rec = {k: v for k, v in (self.meta.get("bridge") or {}).items() if k in known}
        return BridgeConfig(**{**rec, **self.sampler.bridge_record(), "steps": steps})


def load_teacher(cfg: DistillConfig, model: RefinerConfig) -> Teacher:
    """The teacher export, refused in one line unless its RefinerConfig is `model` (the student's)."""
    from surf_train.models.loading import load_refiner

    path = cfg.teacher
    if not os.path.isabs(path) and not os.path.exists(path) and (DATA_DIR / path).is_dir():
        path = str(DATA_DIR / path)  # a shipped export (assets/...) from any working directory, as base models are
    try:
        net, meta = load_refiner(path, dtype=torch.float32)
    except ConfigError as e:
        raise ConfigError(f"module.distill.teacher: {e}") from None  # e names the path
    want, got = dataclasses.asdict(model), dataclasses.asdict(net.cfg)
    diff = [k for k in want if k not in RUNTIME_FIELDS and want[k] != got[k]]
    if diff:
        raise ConfigError(
            f"module.distill.teacher={cfg.teacher} is a Refiner with {', '.join(f'{k}={got[k]}' for k in diff)} but "
            f"model has {', '.join(f'{k}={want[k]}' for k in diff)}: the student takes the teacher's shape"
        )
    return Teacher(net, RefinerSampler.from_bridge(meta.get("bridge") or {}), meta)


def distill_loss(
    student: RefinerFn,
    teacher: RefinerFn,
    sampler: RefinerSampler,
    steps: int,
    preview: torch.Tensor,
    target: torch.Tensor,
    text: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    gt_weight: float = 0.0,
) -> torch.Tensor:
    """mse(student's `steps`-step output, teacher's K-step output) + gt_weight * mse(student's, target), both
    sampled by the teacher's `sampler` from one start point drawn with `generator`; preview (B, C, F, h, w),
    target (B, C, F, H, W)."""
    x_up = sampler.upsample(preview, tuple(target.shape[-2:]))  # (B, C, F, H, W)
    x_start = sampler.start(x_up, preview, generator)
    with torch.no_grad():
        want = sampler.integrate(teacher, x_start, x_up, preview, text)
    got = sampler.override(steps=steps).integrate(student, x_start, x_up, preview, text).float()
    loss = F.mse_loss(got, want.float())
    if gt_weight:
        loss = loss + gt_weight * F.mse_loss(got, target.float())
    return loss


def provenance(distill: dict | None) -> dict | None:
    """surf.json's `distilled_from` of a distilled run's export: the teacher (a local path as its directory name,
    never the training machine's layout) and the ground-truth weight."""
    if not distill:
        return None
    d = dataclasses.asdict(DistillConfig(**known_keys(distill, DistillConfig, "module.distill")))
    return {**d, "teacher": os.path.basename(d["teacher"].rstrip("/")) if os.path.isabs(d["teacher"]) else d["teacher"]}
