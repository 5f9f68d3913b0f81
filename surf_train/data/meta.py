"""What a pair records about the base model and its run: the base model's part of a pairs directory's
fingerprint (weights digest included), and each sample's `base`, `schedule` and `reshift` metadata (with Wan 2.2's
experts). Shared by the generated pairs (data.pairs) and the pairs from real videos (data.video_pairs)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from surf_train.base import BaseModel, BaseSpec
from surf_train.base.sampling import PreviewPlan
from surf_train.data.shards import ShardError
from surf_train.models.refiner import PREVIEW_KINDS


def base_fingerprint(b: BaseSpec) -> dict:
    """The base model's part of a pairs directory's fingerprint (a local directory's weights included, so
    pairs of a retrained base are never appended to those of the old one)."""
    return {
        "base": b.model_id,
        "revision": b.revision,
        "negative_prompt": b.negative_prompt,
        "max_sequence_length": b.max_sequence_length,
        "model_dtype": b.dtype,
        "scheduler": b.scheduler,
        "weights": weights_digest(b.source),
        # Wan 2.2's experts (absent for one expert, so one-expert fingerprints stay as they were)
        **({"boundary": b.boundary, "guidance_2": b.guidance_2} if b.boundary is not None else {}),
    }


WHOLE_FILE = 64 << 20  # files up to this size are hashed whole; larger ones by size and first and last MiB


def weights_digest(source: str | None) -> str | None:
    """sha256 of a local model directory's files (None for a hub id or the tiny random model: the hub
    id and `revision` name those). Files over 64 MiB (real checkpoint shards) are hashed by size and their
    first and last MiB, which covers safetensors headers and keeps a 28 GB Wan 14B directory fast."""
    if not source or not os.path.isdir(source):
        return None
    h = hashlib.sha256()
    root = Path(source)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= WHOLE_FILE:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def base_meta(b: BaseSpec) -> dict:
    """The base model as named in each sample's metadata."""
    return {"name": b.name, "id": b.model_id, "revision": b.revision, "family": b.family}


def expert_meta(model: BaseModel, plan: PreviewPlan, prefix_hw: tuple[int, int], guidance: float) -> dict | None:
    """Wan 2.2's two experts in a pair's metadata: the boundary, each expert's guidance and how many steps of
    each branch it ran (read off the schedules: base.wan.branch_experts); None for one expert."""
    if model.spec.boundary is None:
        return None
    from surf_train.base.wan import branch_experts

    g = dict(zip(("transformer", "transformer_2"), model.guidances(guidance)))
    runs = branch_experts(plan, prefix_hw, model.spec.boundary)
    return {
        "boundary": model.spec.boundary,
        "guidance": g,
        **{branch: {e: names.count(e) for e in g if e in names} for branch, names in runs.items()},
    }


def schedule_meta(plan: PreviewPlan, steps: int, guidance: float, experts: dict | None = None) -> dict:
    """A pair's `schedule` and `reshift` metadata: how the base model ran and where it switched to the preview
    (experts: `expert_meta`, for Wan 2.2's two)."""
    return {
        "schedule": {
            "steps": steps,
            "shift": plan.schedule.shift,
            "guidance": guidance,
            "scheduler": type(plan.schedule.scheduler).__name__,
            **({"experts": experts} if experts else {}),
        },
        "reshift": {
            "switch": plan.switch,
            "sigma_switch": float(plan.sigmas[plan.switch]),
            "rule": plan.rule,
            "down": plan.down,
        },
    }


def preview_kind(meta: dict) -> str:
    """A sample's preview kind (models.refiner.PREVIEW_KINDS): its `preview_kind` metadata, or for shards written
    before that field, read off what made the preview: make_pairs at switch = steps pools the finished target
    (exact), at an earlier switch finishes after reshifting (generated); make_video_pairs degrades the clip
    (degraded) or lets the base model finish it at preview size (repreview: generated). Metadata that says
    neither: generated, SURF's own kind."""
    kind = meta.get("preview_kind")
    if kind is None:
        kind = "generated"
        if meta.get("source") == "video":
            kind = "degraded" if meta.get("preview_mode", "degrade") == "degrade" else "generated"
        elif "switch" in meta.get("reshift", {}) and "steps" in meta.get("schedule", {}):
            kind = "exact" if meta["reshift"]["switch"] >= meta["schedule"]["steps"] else "generated"
    if kind not in PREVIEW_KINDS:
        raise ShardError(f"sample {meta.get('key', '?')}: preview kind {kind!r} is not one of {PREVIEW_KINDS}")
    return kind
