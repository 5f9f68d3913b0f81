"""The default mode of surf_train.evaluate (`cfg` is its EvalConfig): previews (direct, <rule>@<k>), the SURF
preview upsampled and refined, each against the native run, with measured seconds and analytic FLOPs per clip."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from surf_train.base import BaseModel
from surf_train.base.sampling import PreviewPlan, finish_preview
from surf_train.common.errors import ConfigError
from surf_train.evaluation.clips import (
    Batch,
    Recorder,
    Setup,
    batch,
    native_run,
    refine_gflops,
    refiner_text,
    sampler_at,
    setup,
)
from surf_train.evaluation.metrics import score_batch
from surf_train.evaluation.report import keep_shown, write_grid, write_outputs
from surf_train.evaluation.stats import summarise
from surf_train.models.sampler import RefinerSampler, upsample


def method_names(cfg) -> list[str]:
    """reference, direct, every <rule>@<k>, SURF's preview, upsampled and (with a Refiner) surf."""
    names = ["reference", "direct", *[f"{r}@{k}" for k in cfg.switches for r in cfg.rules]]
    if f"{cfg.surf_rule}@{cfg.surf_switch}" not in names:
        names.append(f"{cfg.surf_rule}@{cfg.surf_switch}")
    return names + ["upsampled"] + (["surf"] if cfg.refiner != "none" else [])


def call_flops(model: BaseModel, lat_shape: tuple[int, ...], guidance: float | None) -> int:
    """Analytic FLOPs of one velocity call on one clip's latent (two forwards under CFG)."""
    from surf_train.cost import total, wan_flops

    if model.spec.family != "wan":
        raise ConfigError(
            f"the evaluation's FLOPs model covers Wan-family base models; {model.spec.name} is {model.spec.family}"
        )
    g = model.spec.guidance if guidance is None else guidance
    return (2 if g != 1.0 else 1) * total(wan_flops(model.flops_config, lat_shape, model.spec.max_sequence_length))


def _previews(cfg, st: Setup, b: Batch, flops: dict) -> tuple[dict, dict]:
    """The reference and every preview of a batch: method -> latent, method -> (seconds, FLOPs per clip)."""
    vel = st.model.velocity_fn(b.cond, cfg.guidance)
    # reference: the full native run, keeping the latent at every switch step used below
    rec = Recorder(vel)
    x, kept = native_run(st, rec, b.noise, set(cfg.switches) | {cfg.surf_switch})
    latents = {"reference": x}
    cost = {"reference": (rec.seconds(), cfg.steps * flops[st.hi])}
    # direct low-resolution generation = `pool` at switch 0: downsampled noise, resolution-shifted schedule
    for name, k, rule in (
        [("direct", 0, "pool")]
        + [(f"{r}@{k}", k, r) for k in cfg.switches for r in cfg.rules]
        + [(f"{cfg.surf_rule}@{cfg.surf_switch}", cfg.surf_switch, cfg.surf_rule)]
    ):
        if name in latents:
            continue
        plan = PreviewPlan(st.schedule, switch=k, preview_size=st.lo, rule=rule)
        r2 = Recorder(vel)
        latents[name] = finish_preview(r2, b.noise if k == 0 else kept[k], plan, b.fresh)
        n_lo = sum(1 for s, _ in r2.calls if s == st.lo)
        cost[name] = (
            rec.seconds(k) + r2.seconds(),
            k * flops[st.hi] + n_lo * flops[st.lo] + (len(r2.calls) - n_lo) * flops[st.hi],
        )
    return latents, cost


def _refine(cfg, st: Setup, sampler: RefinerSampler, b: Batch, latents: dict, cost: dict) -> None:
    """Add `upsampled` (SURF's preview upsampled bilinearly: one baseline whatever the Refiner's own upsampling) and,
    with a Refiner, `surf` (the preview refined from the Refiner's upsampling) to latents and cost."""
    surf_name = f"{cfg.surf_rule}@{cfg.surf_switch}"
    k_ref = cfg.refiner_steps or sampler.steps
    t0 = time.perf_counter()
    latents["upsampled"] = upsample(latents[surf_name], st.hi, "bilinear")
    cost["upsampled"] = (cost[surf_name][0] + time.perf_counter() - t0, cost[surf_name][1])
    if st.net is not None:
        t0 = time.perf_counter()
        x_up = sampler.upsample(latents[surf_name], st.hi)
        run = sampler_at(sampler, k_ref, cfg.consistency, cfg.start_noise, cfg.preview_kind or "generated")
        latents["surf"] = run.refine(st.net, x_up, latents[surf_name], refiner_text(st.net, b.cond), b.gens[0])
        cost["surf"] = (
            cost["upsampled"][0] + time.perf_counter() - t0,
            cost[surf_name][1] + 1e9 * refine_gflops(st, k_ref),
        )


def evaluate_fidelity(cfg) -> dict:
    """Run every method on every clip; returns the summary (also written to cfg.out_dir)."""
    st = setup(cfg)
    sampler = st.sampler or RefinerSampler()  # no Refiner: only its upsampling is used
    flops = {s: call_flops(st.model, (st.c, st.f_lat, *s), cfg.guidance) for s in (st.hi, st.lo)}
    names = method_names(cfg)
    per: dict[str, list[dict]] = {m: [] for m in names}
    shown: dict[str, list[torch.Tensor]] = {m: [] for m in ("reference", "upsampled", "surf") if m in names}
    for i0 in tqdm(range(0, cfg.n, cfg.batch), desc="evaluate", unit="batch", disable=not cfg.progress):
        b = batch(st, i0, cfg.batch, cfg.seed)
        latents, cost = _previews(cfg, st, b, flops)
        _refine(cfg, st, sampler, b, latents, cost)
        videos = {m: st.model.vae_decode(latents[m]) for m in names}
        keep_shown(shown, videos, cfg.grid_clips)
        n = len(b.prompts)
        extra = {m: dict(seconds=cost[m][0] / n, gflops=cost[m][1] / 1e9) for m in names}
        score_batch(per, videos, videos["reference"], b.prompts, st.preview_px, extra)
    result = summarise(cfg, per, names, st.prompts)
    write_outputs(cfg, result)
    write_grid(cfg, shown, "grid.png")
    return result
