"""SURF composed with acceleration plug-ins on the toy world (`cfg` is surf_train.evaluate_accel's AccelEvalConfig):
every method on the same clips in one process, in an order rotated per batch, so the measured wall times compare;
its summary against `surf`, table and plot."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from surf_train.base import Acceleration, BaseSpec
from surf_train.common.errors import ConfigError
from surf_train.evaluation.clips import Batch, Setup, batch, load_setup, refine_flops, refiner_text
from surf_train.evaluation.metrics import score_batch
from surf_train.evaluation.report import save_figure, table_head, two_panels, write_files
from surf_train.evaluation.stats import mean_ci
from surf_train.models.sampler import RefinerSampler

METRICS = ("all3", "pos_err", "psnr_lo")


@dataclass(frozen=True)
class Method:
    name: str
    surf: bool  # preview + Refiner (else the native run)
    steps: int
    switch: int
    acc: Acceleration


def methods(cfg) -> list[Method]:
    """baseline, baseline+cache, surf and its plug-in variants, surf@<fewer steps>; --methods picks a subset."""
    cache, low = Acceleration(cache_threshold=cfg.cache_threshold), Acceleration(cfg_low=False)
    both = Acceleration(cache_threshold=cfg.cache_threshold, cfg_low=False)
    stop, cache_stop = Acceleration(cfg_stop=cfg.cfg_stop), Acceleration(cfg.cache_threshold, cfg.cfg_stop)
    # about the same share of steps before the switch, halves rounded up (round() would give 5 * 10 / 20 -> 2)
    k_few = max(1, int(cfg.switch * cfg.fewer_steps / cfg.steps + 0.5))
    out = [
        Method("baseline", False, cfg.steps, cfg.steps, Acceleration()),
        Method("baseline+cache", False, cfg.steps, cfg.steps, cache),
        Method("surf", True, cfg.steps, cfg.switch, Acceleration()),
        Method("surf+cache", True, cfg.steps, cfg.switch, cache),
        Method("surf+cfg-low", True, cfg.steps, cfg.switch, low),
        Method("surf+cache+cfg-low", True, cfg.steps, cfg.switch, both),
        Method("surf+cfg-stop", True, cfg.steps, cfg.switch, stop),
        Method("surf+cache+cfg-stop", True, cfg.steps, cfg.switch, cache_stop),
        Method(f"surf@{cfg.fewer_steps}", True, cfg.fewer_steps, k_few, Acceleration()),
    ]
    if cfg.methods:
        unknown = sorted(set(cfg.methods) - {m.name for m in out})
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose from {[m.name for m in out]}")
        out = [m for m in out if m.name in cfg.methods or m.name in ("baseline", "surf")]
    return out


def _run(cfg, st: Setup, m: Method, b: Batch) -> tuple[torch.Tensor, float, float]:
    """One method on one batch: its latent, wall seconds, and base-model FLOPs actually done per clip."""
    from surf_train.base.sampling import PreviewPlan, preview_sample, sample
    from surf_train.cost import metered_flops

    model, spec = st.model, st.spec
    model.accelerate(m.acc)
    model.meter.reset()
    vel = model.velocity_fn(b.cond, None, m.acc)
    text = refiner_text(st.net, b.cond)
    t0 = time.perf_counter()
    with torch.no_grad():
        if not m.surf:
            x = sample(vel, b.noise, model.schedule(m.steps))
        else:
            plan = PreviewPlan(model.schedule(m.steps), switch=m.switch, preview_size=st.lo, rule=cfg.rule)
            pre = preview_sample(vel, b.noise, plan, b.fresh)
            x = st.sampler.override(preview_kind="generated")(st.net, pre, st.hi, text, b.gens[0])
    seconds = time.perf_counter() - t0
    lat = {hw: (st.c, st.f_lat, *hw) for hw in model.meter.forwards}
    meter = model.meter
    done = metered_flops(spec.family, model.flops_config, lat, meter.forwards, meter.blocks, spec.max_sequence_length)
    return x, seconds, sum(done.values()) / len(b.prompts)


def evaluate_accel(cfg) -> dict:
    """Run every method on every clip; returns the summary (also written to cfg.out_dir)."""
    from surf_train.models.loading import load_refiner

    cfg.check()
    spec = BaseSpec.from_name(cfg.base)
    net, meta = load_refiner(cfg.refiner)
    st = load_setup(spec, net, RefinerSampler.from_bridge(meta.get("bridge", {})), cfg.n, cfg.steps)
    surf_flops = refine_flops(st, st.sampler.steps)
    ms = methods(cfg)
    per = {m.name: [] for m in ms}
    seconds = {m.name: [] for m in ms}  # per batch
    blocks = {m.name: [] for m in ms}
    for bi, i0 in enumerate(tqdm(range(0, cfg.n, cfg.batch), desc="accel", unit="batch", disable=not cfg.progress)):
        b = batch(st, i0, cfg.batch, cfg.seed)
        latents, gflops = {}, {}
        for m in ms[bi % len(ms) :] + ms[: bi % len(ms)]:  # rotated: no method always runs first or last
            latents[m.name], secs, done = _run(cfg, st, m, b)
            seconds[m.name].append(secs)
            gflops[m.name] = (done + (surf_flops if m.surf else 0)) / 1e9  # per clip
            blocks[m.name].append(st.model.meter.block_fraction(None, st.model.block_lists))
        st.model.accelerate(Acceleration())
        videos = {name: st.model.vae_decode(x) for name, x in latents.items()}
        extra = {name: {"gflops": g} for name, g in gflops.items()}
        score_batch(per, videos, videos["baseline"], b.prompts, st.preview_px, extra)
    result = summarise(cfg, ms, per, seconds, blocks)
    write_outputs(cfg, result)
    return result


def summarise(cfg, ms: list[Method], per: dict, seconds: dict, blocks: dict) -> dict:
    """Per method: cost, the wall-time ratio to surf (interval over batches), metrics and their paired differences
    to surf (intervals over clips), and whether it meets the issue's bar."""
    rows = {}
    n = len(per["surf"])
    t_surf = np.array(seconds["surf"])
    rng = np.random.default_rng(0)
    for m in ms:
        arr = {k: np.array([r[k] for r in per[m.name]]) for k in (*METRICS, "gflops")}
        t = np.array(seconds[m.name])
        idx = rng.integers(0, len(t), (cfg.bootstrap, len(t)))  # batches resampled: the wall-time ratio
        ratio = t_surf[idx].sum(1) / t[idx].sum(1)
        row = {
            "ms_per_clip": round(1000 * t.sum() / n, 2),
            "gflops": round(float(arr["gflops"].mean()), 3),
            "speedup_vs_surf": round(float(t_surf.sum() / t.sum()), 3),
            "speedup_vs_surf_ci95": [
                round(float(np.percentile(ratio, 2.5)), 3),
                round(float(np.percentile(ratio, 97.5)), 3),
            ],
            "blocks_run": round(float(np.mean(blocks[m.name])), 4),
            "settings": {"steps": m.steps, "switch": m.switch if m.surf else None, **asdict(m.acc)},
        }
        for k in METRICS:
            row[k] = round(float(arr[k].mean()), 4)
            d = mean_ci(arr[k] - np.array([r[k] for r in per["surf"]]), cfg.bootstrap)
            row[f"{k}_minus_surf"], row[f"{k}_minus_surf_ci95"] = d["mean"], d["ci95"]
        rows[m.name] = row
    # the issue's bar: >= 1.5x less wall time than SURF alone, caption match within 0.05, position within 0.01
    for name, r in rows.items():
        r["meets_bar"] = (
            bool(name.startswith("surf+") or name.startswith("surf@"))
            and r["speedup_vs_surf"] >= 1.5
            and abs(r["all3_minus_surf"]) <= 0.05
            and r["pos_err_minus_surf"] <= 0.01
        )
    return {"config": asdict(cfg), "n": n, "methods": rows, "per_clip": per, "seconds_per_batch": seconds}


def _bar(methods: dict) -> str:
    """Which plug-ins meet the bar, or how close the fast and the faithful ones come."""
    rows = {k: r for k, r in methods.items() if k.startswith(("surf+", "surf@"))}
    met = [k for k, r in rows.items() if r["meets_bar"]]
    fast = [
        f"{k} (caption {r['all3_minus_surf']:+.3f}, position {r['pos_err_minus_surf']:+.4f})"
        for k, r in rows.items()
        if r["speedup_vs_surf"] >= 1.5
    ]
    faithful = [
        f"{k} ({r['speedup_vs_surf']:.2f}x)"
        for k, r in rows.items()
        if abs(r["all3_minus_surf"]) <= 0.05 and r["pos_err_minus_surf"] <= 0.01
    ]
    verdict = (
        f"met by {', '.join(met)}."
        if met
        else f"not met. At >= 1.5x: {', '.join(fast) or 'none'}. Within both fidelity limits: "
        f"{', '.join(faithful) or 'none'}."
    )
    return (
        "Bar (>= 1.5x less wall time than surf, caption match within 0.05 and position error within 0.01 of "
        "it): " + verdict
    )


def caption(cfg: dict, n: int) -> str:
    """What accel.md's table compares, and how it was measured."""
    return (
        f"N = {n} (caption, seed) pairs, base `{cfg['base']}`, {cfg['steps']} steps; SURF = Refiner on "
        f"`{cfg['rule']}@{cfg['switch']}`; cache = FirstBlockCache threshold {cfg['cache_threshold']}. "
        f"Reference: the plain native run. Wall time measured in this one run (batches of {cfg['batch']}, "
        f"methods in rotated order); intervals are 95% bootstrap (clips; batches for the time ratio)."
    )


def format_table(result: dict) -> str:
    """accel.md: every method's fidelity, cost and speedup against surf, then the bar."""
    lines = [
        caption(result["config"], result["n"]),
        "",
        *table_head(
            "method",
            "all 3 match",
            "vs surf",
            "shape",
            "direction",
            "position err",
            "vs surf",
            "PSNR@preview dB",
            "blocks run",
            "GFLOPs/clip",
            "ms/clip",
            "speedup vs surf",
            "meets bar",
        ),
    ]
    for name, r in result["methods"].items():
        clips = result["per_clip"][name]
        attr = lambda k: sum(c[k] for c in clips) / len(clips)  # which part of the caption match moves
        ci = lambda k: (
            f"{r[k + '_minus_surf']:+.3f} [{r[k + '_minus_surf_ci95'][0]:+.3f}, {r[k + '_minus_surf_ci95'][1]:+.3f}]"
        )
        psnr = "ref" if name == "baseline" else f"{r['psnr_lo']:.2f}"
        lines.append(
            f"| {name} | {r['all3']:.3f} | {ci('all3')} | {attr('shape'):.3f} | {attr('direction'):.3f} | "
            f"{r['pos_err']:.4f} | {ci('pos_err')} | {psnr} | "
            f"{r['blocks_run']:.2f} | {r['gflops']:.2f} | {r['ms_per_clip']:.0f} | {r['speedup_vs_surf']:.2f}x "
            f"[{r['speedup_vs_surf_ci95'][0]:.2f}, {r['speedup_vs_surf_ci95'][1]:.2f}] | "
            f"{'yes' if r['meets_bar'] else 'no'} |"
        )
    return "\n".join([*lines, "", _bar(result["methods"])]) + "\n"


def plot(result: dict, path: Path) -> None:
    """Position error and caption match versus measured ms per clip, with each method's paired interval to surf."""
    fig, axes = two_panels()
    for ax, k, label in (
        (axes[0], "pos_err", "object position error vs reference"),
        (axes[1], "all3", "caption match (colour, shape, direction)"),
    ):
        for name, r in result["methods"].items():
            d, (lo, hi) = r[f"{k}_minus_surf"], r[f"{k}_minus_surf_ci95"]  # bars: paired interval vs surf
            ax.errorbar(
                r["ms_per_clip"],
                r[k],
                yerr=[[d - lo], [hi - d]],
                fmt="o",
                capsize=3,
                color="r" if name.startswith("surf") else "k",
            )
            ax.annotate(name, (r["ms_per_clip"], r[k]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("measured ms per clip (this run)")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Toy world: SURF with acceleration plug-ins (N={result['n']}; bars: 95% bootstrap interval of "
        f"the paired difference to surf)",
        fontsize=10,
    )
    save_figure(fig, path)


def write_outputs(cfg, result: dict) -> None:
    """accel.json, accel.md and accel.png in --out-dir."""
    out = Path(cfg.out_dir)
    write_files(out, {"accel.json": json.dumps(result, indent=1), "accel.md": format_table(result)})
    plot(result, out / "accel.png")
