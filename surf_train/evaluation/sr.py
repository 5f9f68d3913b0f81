"""--mode sr of surf_train.evaluate (`cfg` is its EvalConfig): the native generation's latent area-pooled to the
preview grid, upsampled back by bilinear, bicubic and the Refiner at every K in --ks (and a --compare Refiner at its
own K), compared with the native generation, where the answer is determined."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from surf_train.base.sampling import resize_latent
from surf_train.evaluation.clips import (
    Recorder,
    Setup,
    batch,
    load_checked_refiner,
    native_run,
    refine_gflops,
    refiner_text,
    sampler_at,
    setup,
)
from surf_train.evaluation.metrics import score_batch
from surf_train.evaluation.report import keep_shown, write_grid, write_sr_outputs
from surf_train.evaluation.stats import CONSISTENT_BILINEAR, summarise_sr
from surf_train.models.sampler import RefinerSampler, match_preview, upsample

SR_UPSAMPLERS = ("bilinear", "bicubic")  # latent-space upsamplers the Refiner must beat (bilinear: the baseline)


def refiners(cfg, st: Setup) -> dict[str, tuple[object, RefinerSampler]]:
    """Method name -> (Refiner, its sampler at K): --refiner at every K in --ks, --compare at its own K."""
    out, kind = {}, cfg.preview_kind or "exact"  # the reference pooled: an exact preview
    if st.net is not None:
        out = {
            f"refiner@{k}": (st.net, sampler_at(st.sampler, k, cfg.consistency, cfg.start_noise, kind)) for k in cfg.ks
        }
    if cfg.compare:
        net2, sampler2 = load_checked_refiner(cfg.compare, st.spec)
        out[f"compare@{sampler2.steps}"] = (net2, sampler_at(sampler2, sampler2.steps, cfg.consistency, None, kind))
    return out


def _shown_names(cfg, st: Setup, names: list[str]) -> list[str]:
    """The grid's columns: reference, bilinear, the Refiner at its own K, any --compare Refiner."""
    k_show = cfg.refiner_steps or (st.sampler or RefinerSampler()).steps
    k_show = k_show if k_show in cfg.ks else max(cfg.ks)
    shown = ["reference", "bilinear", *([f"refiner@{k_show}"] if st.net is not None else [])]
    return shown + [m for m in names if m.startswith("compare@")]


def _upsample_all(cfg, st: Setup, ups: list[str], refs: dict, x_lo: torch.Tensor, b, i0: int) -> tuple[dict, dict]:
    """Every method's native-grid latent from the (B, C, F, h, w) preview `x_lo`, and its seconds per batch."""
    latents, secs = {}, {}
    for m in ups:
        t0 = time.perf_counter()
        latents[m] = upsample(x_lo, st.hi, m) if m != CONSISTENT_BILINEAR else match_preview(latents["bilinear"], x_lo)
        secs[m] = time.perf_counter() - t0
    for m, (r, s) in refs.items():
        t0 = time.perf_counter()
        latents[m] = s(r, x_lo, st.hi, refiner_text(r, b.cond), torch.Generator().manual_seed(cfg.seed + i0))
        secs[m] = time.perf_counter() - t0
    return latents, secs


def evaluate_sr(cfg) -> dict:
    """Run every upsampler on every clip; returns the summary (also written to cfg.out_dir, with grid_sr.png:
    reference | bilinear | Refiner at its stored K)."""
    st = setup(cfg)
    refs = refiners(cfg, st)
    # with --consistency on, bilinear projected onto the preview too: the share of the gain that needs no network
    ups = [*SR_UPSAMPLERS, *([CONSISTENT_BILINEAR] if cfg.consistency == "on" else [])]
    names = [*ups, *refs]
    gflops = dict.fromkeys(ups, 0.0) | {m: refine_gflops(st, s.steps, r) for m, (r, s) in refs.items()}
    per: dict[str, list[dict]] = {m: [] for m in names}
    shown: dict[str, list[torch.Tensor]] = {m: [] for m in _shown_names(cfg, st, names)}
    for i0 in tqdm(range(0, cfg.n, cfg.batch), desc="evaluate sr", unit="batch", disable=not cfg.progress):
        b = batch(st, i0, cfg.batch, cfg.seed)
        x_ref, _ = native_run(st, Recorder(st.model.velocity_fn(b.cond, cfg.guidance)), b.noise)  # (B, C, F, H, W)
        x_lo = resize_latent(x_ref, st.lo, "area")  # the preview the Refiner would see, without the preview's drift
        latents, secs = _upsample_all(cfg, st, ups, refs, x_lo, b, i0)
        ref_videos = st.model.vae_decode(x_ref)
        videos = {m: st.model.vae_decode(latents[m]) for m in names}
        keep_shown(shown, videos | {"reference": ref_videos}, cfg.grid_clips)
        n = len(b.prompts)
        extra = {m: dict(seconds=secs[m] / n, gflops=gflops[m]) for m in names}
        score_batch(per, videos, ref_videos, b.prompts, st.preview_px, extra, dilate=cfg.mask_dilate)
    result = summarise_sr(cfg, per, names, st.prompts)
    write_sr_outputs(cfg, result)
    write_grid(cfg, shown, "grid_sr.png")
    return result
