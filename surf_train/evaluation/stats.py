"""Bootstrap intervals over clips and the summaries of the two modes of surf_train.evaluate (`cfg` is its
EvalConfig)."""

from __future__ import annotations

import itertools
from dataclasses import asdict

import numpy as np

from surf_train.base.sampling import RULES

CONSISTENT_BILINEAR = "bilinear+consistency"  # sr with --consistency on: bilinear projected onto the preview
K_METRICS = ("psnr", "psnr_obj", "psnr_bg", "ssim", "sharpness", "obj_iou")  # the K table's fidelity columns
SR_METRICS = ("psnr", "psnr_obj", "psnr_bg", "psnr_lo", "ssim", "sharpness", "obj_iou", "pos_err", "all3")


def bootstrap_ci(diff: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `diff` over resampled clips."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mean_ci(d: np.ndarray, n_boot: int) -> dict:
    """Mean of the paired differences `d` with its 95% bootstrap interval, and whether that excludes 0."""
    lo, hi = bootstrap_ci(d, n_boot)
    return dict(mean=round(float(d.mean()), 4), ci95=[round(lo, 4), round(hi, 4)], separated=bool(lo > 0 or hi < 0))


def values(per: list[dict], key: str) -> np.ndarray:
    """Per-clip values of one metric; None (an empty region) becomes NaN."""
    return np.array([np.nan if row[key] is None else row[key] for row in per], float)


def paired_gain(a: np.ndarray, b: np.ndarray, n_boot: int) -> dict:
    """Mean of a - b over the clips where both are defined, with its 95% bootstrap interval."""
    d = a - b
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return dict(mean=None, ci95=[None, None], separated=False, clips=0)
    return dict(**mean_ci(d, n_boot), clips=len(d))


def comparisons(cfg, names: list[str]) -> list[tuple[str, str, str]]:
    """(method a, method b, metric): the paired differences the README's questions need."""
    out = []
    rules = [r for r in RULES if r in cfg.rules]  # RULES order: each rule against every earlier one
    for k in cfg.switches:
        out += [(f"{r}@{k}", "direct", "pos_err") for r in cfg.rules]
        for b, a in itertools.combinations(rules, 2):
            out += [(f"{a}@{k}", f"{b}@{k}", m) for m in ("pos_err", "psnr")]
    if "surf" in names:
        out += [("surf", "upsampled", m) for m in ("psnr", "ssim", "obj_iou", "pos_err")]
        out.append(("surf", f"{cfg.surf_rule}@{cfg.surf_switch}", "psnr_lo"))
    return out


def iou_by_shape(per: dict[str, list[dict]], names: list[str], prompts: list[str]) -> dict[str, dict[str, float]]:
    """Mean object-mask IoU of each method per shape of the captioned object (thin bars and pillars break up
    where a circle survives)."""
    from surf_train.data.toyworld import SHAPES, Caption

    shapes = [Caption.parse(p).shape for p in prompts]
    return {
        m: {
            s: round(float(np.mean([r["obj_iou"] for r, x in zip(per[m], shapes) if x == s])), 4)
            for s in SHAPES
            if s in shapes
        }
        for m in names
    }


def summarise(cfg, per: dict[str, list[dict]], names: list[str], prompts: list[str]) -> dict:
    """Means per method and the paired differences of comparisons() with their intervals (default mode)."""
    metrics = list(per[names[0]][0])
    arr = {m: {k: np.array([row[k] for row in per[m]]) for k in metrics} for m in names}
    methods = {m: {k: round(float(arr[m][k].mean()), 4) for k in metrics} for m in names}
    diffs = [
        dict(a=a, b=b, metric=metric, **mean_ci(arr[a][metric] - arr[b][metric], cfg.bootstrap))
        for a, b, metric in comparisons(cfg, names)
    ]
    return {
        "config": asdict(cfg),
        "n": len(prompts),
        "prompts": prompts,
        "methods": methods,
        "paired": diffs,
        "iou_by_shape": iou_by_shape(per, names, prompts),
        "per_clip": {m: per[m] for m in names},
    }


def summarise_sr(cfg, per: dict[str, list[dict]], names: list[str], prompts: list[str]) -> dict:
    """Means per method, sharpness intervals, gains over bilinear with intervals, and the K table."""
    metrics = list(per[names[0]][0])
    methods = {}
    for m in names:
        v = {k: values(per[m], k) for k in metrics}
        methods[m] = {k: (round(float(np.nanmean(x)), 4) if np.isfinite(x).any() else None) for k, x in v.items()}
        lo, hi = bootstrap_ci(v["sharpness"], cfg.bootstrap)
        methods[m]["sharpness_ci95"] = [round(lo, 4), round(hi, 4)]
    # gains over bilinear; with --consistency on also the Refiners' over bilinear+consistency
    pairs = [(m, "bilinear") for m in names if m != "bilinear"]
    if CONSISTENT_BILINEAR in names:
        pairs += [(m, CONSISTENT_BILINEAR) for m in names if m.startswith(("refiner@", "compare@"))]
    paired = [
        dict(a=a, b=b, metric=k, **paired_gain(values(per[a], k), values(per[b], k), cfg.bootstrap))
        for a, b in pairs
        for k in SR_METRICS
    ]
    k_table = [
        dict(k=k, **{x: methods[f"refiner@{k}"][x] for x in K_METRICS})
        | dict(gflops=methods[f"refiner@{k}"]["gflops"], ms=round(1000 * methods[f"refiner@{k}"]["seconds"], 2))
        for k in cfg.ks
        if f"refiner@{k}" in methods
    ]
    return {
        "mode": "sr",
        "config": asdict(cfg),
        "n": len(prompts),
        "prompts": prompts,
        "methods": methods,
        "paired": paired,
        "k_table": k_table,
        "iou_by_shape": iou_by_shape(per, names, prompts),
        "per_clip": {m: per[m] for m in names},
    }
