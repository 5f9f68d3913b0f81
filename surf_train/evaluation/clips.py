"""What every evaluation shares: the base model and its geometry, the Refiner under test and its sampler, the
clips' prompts and noise batch by batch, the native reference run, and the Refiner's analytic cost."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from surf_train.base import BaseModel, BaseSpec, Cond, latent_frames, load_base_model
from surf_train.base.sampling import scheduler_steps
from surf_train.common.errors import ConfigError
from surf_train.models.sampler import RefinerSampler


class Recorder:
    """Wraps a velocity callable; records (latent size, seconds) of every call in order."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, step):
        t0 = time.perf_counter()
        out = self.fn(x, step)
        self.calls.append((tuple(x.shape[-2:]), time.perf_counter() - t0))
        return out

    def seconds(self, first: int | None = None) -> float:
        return sum(t for _, t in self.calls[:first])


def load_checked_refiner(path: str, spec: BaseSpec) -> tuple[object, RefinerSampler]:
    """An exported Refiner and its sampler, checked against the base model (a warning for old exports)."""
    from surf_train.models.loading import check_base, load_refiner

    if not Path(path).is_dir():
        raise ConfigError(
            f"--refiner {path}: no exported Refiner there; run `make toy-refiner` or `make demo` (or "
            f"python -m surf_train.export) first, or pass --refiner none"
        )
    net, meta = load_refiner(path)
    warning = check_base(meta, spec, f"Refiner {path}")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return net, RefinerSampler.from_bridge(meta.get("bridge", {}))


@dataclass
class Setup:
    """The base model, its geometry and schedule, the Refiner and the clips' prompts."""

    spec: BaseSpec
    model: BaseModel
    net: object | None  # the Refiner, or None
    sampler: RefinerSampler | None  # the Refiner's, as its export records it
    c: int
    f_lat: int
    hi: tuple[int, int]  # native latent grid
    lo: tuple[int, int]  # preview latent grid
    preview_px: tuple[int, int]
    steps: int
    schedule: object
    prompts: list[str]


def load_setup(spec: BaseSpec, net, sampler: RefinerSampler | None, n: int, steps: int) -> Setup:
    """Load the base model of `spec` (on CPU) beside an already loaded Refiner; `n` prompts from the toy caption
    grammar; the base model's schedule of `steps` steps."""
    from surf_train.data.toyworld import all_captions

    model = load_base_model(spec, "cpu")
    frames, (h, w) = spec.native_frames, spec.native_size
    hi, lo = (h // spec.stride_s, w // spec.stride_s), (h // spec.stride_s // 2, w // spec.stride_s // 2)
    preview_px = (h // 2, w // 2)
    spec.geometry.check(frames, *preview_px, "preview")
    caps = all_captions()
    prompts = [caps[(7 * i) % len(caps)] for i in range(n)]  # 7 is coprime to 72: no early repeats
    return Setup(
        spec=spec,
        model=model,
        net=net,
        sampler=sampler,
        c=spec.channels,
        f_lat=latent_frames(frames, spec.stride_t),
        hi=hi,
        lo=lo,
        preview_px=preview_px,
        steps=steps,
        schedule=model.schedule(steps),  # the base model's own scheduler, as its pipeline sets it
        prompts=prompts,
    )


@dataclass
class Batch:
    """One batch of clips: prompts, one generator per clip, native and preview-grid noise, text conditioning."""

    prompts: list[str]
    gens: list[torch.Generator]
    noise: torch.Tensor  # (B, C, F, H, W) on the native latent grid
    fresh: torch.Tensor  # (B, C, F, H/2, W/2) on the preview grid (re-noising)
    cond: Cond


def batch(st: Setup, i0: int, size: int, seed: int) -> Batch:
    """Clips i0 .. i0 + size - 1; clip i's noise comes from seed + i."""
    ps = st.prompts[i0 : i0 + size]
    gens = [torch.Generator().manual_seed(seed + i0 + j) for j in range(len(ps))]
    noise = torch.stack([torch.randn(st.c, st.f_lat, *st.hi, generator=g) for g in gens])
    fresh = torch.stack([torch.randn(st.c, st.f_lat, *st.lo, generator=g) for g in gens])
    return Batch(ps, gens, noise, fresh, st.model.encode_prompt(ps))


def native_run(st: Setup, rec: Recorder, noise: torch.Tensor, wanted=()) -> tuple[torch.Tensor, dict]:
    """The full native run (the reference) and its latent at every step in `wanted`."""
    x, kept = noise, {}
    sched = st.schedule.start()
    for k in range(st.steps):
        if k in wanted:
            kept[k] = x
        x = scheduler_steps(rec, x, sched, 1, st.steps, start=k == 0)
    return x, kept


def refiner_text(net, cond: Cond) -> torch.Tensor | None:
    """The Refiner's text input: the prompt embeddings where it takes text."""
    return cond.texts().float() if net.cfg.text_dim else None


def sampler_at(
    sampler: RefinerSampler, steps: int, consistency: str | None, start_noise: float | None, kind: str | None = None
) -> RefinerSampler:
    """A Refiner's sampler at K = `steps`, with --consistency (on|off), start noise and the preview kind told a
    Refiner with kind_condition, where given."""
    on = None if consistency is None else consistency == "on"
    return sampler.override(steps=steps, start_noise=start_noise, consistency=on, preview_kind=kind)


def refine_flops(st: Setup, k: int, net=None) -> int:
    """Analytic FLOPs of `k` Refiner passes (st.net's, or `net`'s) on one native clip."""
    from surf_train.cost import refiner_flops, total

    net = net or st.net
    text_len = st.spec.max_sequence_length if net.cfg.text_dim else 0
    return k * total(refiner_flops(net.cfg, (st.c, st.f_lat, *st.hi), text_len))


def refine_gflops(st: Setup, k: int, net=None) -> float:
    """refine_flops in GFLOPs."""
    return refine_flops(st, k, net) / 1e9


def setup(cfg) -> Setup:
    """The setup of surf_train.evaluate's EvalConfig, checked first: its Refiner (none for --refiner none)."""
    cfg.check()
    spec = BaseSpec.from_name(cfg.base)
    net, sampler = load_checked_refiner(cfg.refiner, spec) if cfg.refiner != "none" else (None, None)
    return load_setup(spec, net, sampler, cfg.n, cfg.steps)
