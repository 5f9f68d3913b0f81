"""Run plans: the stages of a baseline run and of a SURF run of one base model, their network calls (steps x CFG
branches) and FLOPs per call; the paper's comparison and the default table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from surf_train.base.sampling import RULES
from surf_train.common.errors import ConfigError
from surf_train.cost.architectures import PAPER, REFINER_FOR, BaseArch, vae_decode_flops
from surf_train.cost.formulas import PFLOP, hit_skipped_flops, refiner_flops, token_grid, total
from surf_train.models.refiner import RefinerConfig
from surf_train.models.windows import Size3


def parse_size(text: str | Sequence[int]) -> tuple[int, int]:
    """'1280x720' (width x height) -> (1280, 720)."""
    if not isinstance(text, str):
        w, h = text
        return int(w), int(h)
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {text!r} must be WIDTHxHEIGHT, e.g. 1280x720") from None
    return w, h


def fmt_size(size: Sequence[int]) -> str:
    """(1280, 720) -> '1280x720'."""
    return f"{size[0]}x{size[1]}"


@dataclass
class Stage:
    """One stage of a run: `calls` network evaluations of `flops_per_call` each (CFG included)."""

    run: str  # baseline | surf
    stage: str  # base | prefix | preview | refine | vae_decode
    network: str
    size: str  # WxH pixels
    latent: list[int]  # (C, F, H, W)
    tokens: int
    calls: int  # network evaluations (steps x CFG branches)
    flops_per_call: int
    parts: dict[str, int] = field(default_factory=dict)  # per-call components

    @property
    def flops(self) -> int:
        return self.calls * self.flops_per_call

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tflops_per_call"] = self.flops_per_call / 1e12
        d["pflops"] = self.flops / PFLOP
        return d


@dataclass
class RunSettings:
    """A baseline run and a SURF run of one base model (sizes are (width, height) in pixels)."""

    model: str = "wan2.1_t2v_14b"
    target: tuple[int, int] = (1280, 720)
    frames: int = 81
    steps: int = 50  # baseline steps
    surf_steps: int | None = 40  # SURF base-model steps, prefix + preview (the paper's 10 + 30); None: steps
    switch: int = 10  # steps at the prefix size before the switch
    prefix: tuple[int, int] | None = None  # None: 480p of the family (PREFIX)
    preview: tuple[int, int] = (416, 240)
    refiner: str = "paper"  # RefinerConfig preset (conf/model)
    window: Size3 | None = None  # None: the preset's
    refiner_steps: int = 10  # Refiner steps
    refiner_text: bool = True  # the Refiner cross-attends to the base model's text tokens
    attn_impl: str = "grouped"
    rule: str = "pool"  # re-noise rule; paper and snr cost one more prefix call (the velocity at the switch)
    cfg: bool | None = None  # CFG batch; None (auto): the family's (Wan on, HunyuanVideo off)
    cfg_low: bool = True  # CFG in SURF's preview steps (off: CFG truncation)
    cfg_stop: int | None = None  # no CFG from this step of each run's schedule on (CFG truncation); None: never
    cache_hits: float = 0.0  # fraction of base-model forwards where FirstBlockCache skips all blocks but the first
    vae: bool = False  # add the VAE decode of the target to both runs (counted on the meta device, seconds)
    label: str = ""


# Native 480p of each family, width a multiple of 16 (VAE 8 x patch 2): Wan 832x480, HunyuanVideo 848x480.
PREFIX = {"wan": (832, 480), "hunyuan": (848, 480), "hunyuan15": (848, 480)}  # 1.5: VAE 16 x patch 1


def run_costs(s: RunSettings) -> dict[str, Any]:
    """Per-stage and total FLOPs of the baseline and the SURF run described by `s` (JSON-ready)."""
    arch = BaseArch.from_name(s.model)
    surf_steps = s.steps if s.surf_steps is None else s.surf_steps
    check_settings(s, surf_steps)
    stop = math.inf if s.cfg_stop is None else s.cfg_stop
    prefix = s.prefix or PREFIX[arch.family]
    cfg_x = (2 if s.cfg else 1) if s.cfg is not None else arch.cfg_factor
    # paper/snr evaluate v once more at the switch (sampling._switch), unless the prefix already reached s = 0.
    extra = int(s.rule != "pool" and s.switch < surf_steps)
    # CFG steps: the prefix runs steps 0..switch-1 (and the extra call at the switch), the preview switch..end
    preview_cfg = max(0, min(surf_steps, stop) - s.switch) if s.cfg_low else 0
    baseline = [base_stage(s, arch, cfg_x, "baseline", "base", s.target, s.steps, min(s.steps, stop))]
    surf = [
        base_stage(s, arch, cfg_x, "surf", "prefix", prefix, s.switch + extra, min(s.switch + extra, stop)),
        base_stage(s, arch, cfg_x, "surf", "preview", s.preview, surf_steps - s.switch, preview_cfg),
    ]
    rcfg = RefinerConfig.preset(
        s.refiner, **REFINER_FOR.get(arch.family, {}), **({"window": tuple(s.window)} if s.window else {})
    )
    surf.append(refine_stage(s, arch, rcfg))
    if s.vae:
        add_vae_decode(s, arch, baseline, surf)
    b_total, s_total = sum(x.flops for x in baseline), sum(x.flops for x in surf)
    return {
        "label": s.label or f"{s.model} {fmt_size(s.target)}",
        "model": s.model,
        "settings": {
            **asdict(s),
            "prefix": list(prefix),
            "surf_steps": surf_steps,
            "cfg_factor": cfg_x,
            "refiner_config": rcfg.to_dict(),
            "text_len": arch.text_len,
        },
        "baseline_pflops": b_total / PFLOP,
        "surf_pflops": s_total / PFLOP,
        "speedup": b_total / s_total,
        "stages": [x.to_dict() for x in baseline + surf],
    }


def check_settings(s: RunSettings, surf_steps: int) -> None:
    """Raise ConfigError on settings no run can have."""
    if s.steps < 1 or surf_steps < 1 or s.refiner_steps < 0:
        raise ConfigError(f"steps must be >= 1 (got {s.steps}, surf {surf_steps}), refiner steps >= 0")
    if not 0 <= s.switch <= surf_steps:
        raise ConfigError(f"switch must be in [0, {surf_steps}], got {s.switch}")
    if s.rule not in RULES:
        raise ConfigError(f"unknown re-noise rule {s.rule!r}; choose from {RULES}")
    if not 0 <= s.cache_hits <= 1:
        raise ConfigError(f"cache_hits={s.cache_hits} must be a fraction in [0, 1]")
    if s.cfg_stop is not None and s.cfg_stop < 0:
        raise ConfigError(f"cfg_stop={s.cfg_stop} must be >= 0")


def base_stage(
    s: RunSettings, arch: BaseArch, cfg_x: int, run: str, stage: str, size: Sequence[int], steps: int, cfg_steps: int
) -> Stage:
    """`steps` base-model velocities at `size`, `cfg_steps` of them with all `cfg_x` CFG branches."""
    lat = arch.latent(s.frames, size)
    parts = arch.flops(lat)
    if s.cache_hits:  # a cache hit runs the first block only (docs/cost.md); the mean over calls
        skipped = hit_skipped_flops(arch.family, arch.config, lat, arch.text_len)
        parts = {**parts, "cache_skipped": -round(s.cache_hits * skipped)}
    patch = (arch.patch_t, arch.patch_s, arch.patch_s)
    tokens, calls = math.prod(token_grid(lat, patch)), steps + cfg_steps * (cfg_x - 1)
    return Stage(run, stage, s.model, fmt_size(size), list(lat), tokens, calls, total(parts), parts)


def refine_stage(s: RunSettings, arch: BaseArch, rcfg: RefinerConfig) -> Stage:
    """`s.refiner_steps` Refiner calls at the target size (one branch: the Refiner has no CFG)."""
    lat = arch.latent(s.frames, s.target)
    parts = refiner_flops(rcfg, lat, arch.text_len if s.refiner_text else 0, impl=s.attn_impl)
    network = f"refiner:{s.refiner} window={list(rcfg.window)}"
    tokens = math.prod(token_grid(lat, rcfg.patch_size))
    return Stage("surf", "refine", network, fmt_size(s.target), list(lat), tokens, s.refiner_steps, total(parts), parts)


def add_vae_decode(s: RunSettings, arch: BaseArch, *runs: list[Stage]) -> None:
    """Append one VAE decode of the target to each run (the same cost in each)."""
    lat = arch.latent(s.frames, s.target)
    flops = vae_decode_flops(s.model, lat)
    for stages in runs:
        stages.append(
            Stage(stages[0].run, "vae_decode", f"vae:{arch.family}", fmt_size(s.target), list(lat), 0, 1, flops)
        )


def default_settings() -> list[RunSettings]:
    """The default table: Wan 2.1 14B (81 frames, CFG) and HunyuanVideo (129 frames) at 1280x720.

    SURF always uses the paper's split for 40 steps (10 at 480p, 30 at 240p) and 10 Refiner steps;
    baselines at 50 steps (the paper's Table 1 baseline, 658.46 PFLOPs) and at 40 steps (same steps).
    """
    out = []
    for model, frames in (("wan2.1_t2v_14b", 81), ("hunyuan_video", 129)):
        for steps in (50, 40):
            out.append(
                RunSettings(
                    model=model,
                    frames=frames,
                    steps=steps,
                    surf_steps=40,
                    switch=10,
                    label=f"{model} 1280x720x{frames}, baseline {steps} steps vs SURF 10+30",
                )
            )
    return out


def paper_comparison(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Our numbers next to the paper's for the runs whose model the paper reports."""
    out = {}
    for r in runs:
        p = PAPER.get(r["model"])
        if not p or r["settings"]["steps"] != 50:
            continue
        row = {
            "ours_baseline_pflops": r["baseline_pflops"],
            "ours_surf_pflops": r["surf_pflops"],
            "ours_speedup_flops": r["speedup"],
            **{f"paper_{k}": v for k, v in p.items()},
        }
        if "baseline_pflops" in p:
            row["baseline_ratio_paper_over_ours"] = p["baseline_pflops"] / r["baseline_pflops"]
            row["surf_ratio_paper_over_ours"] = p["surf_pflops"] / r["surf_pflops"]
        out[r["model"]] = row
    return out
