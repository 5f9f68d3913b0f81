"""Fidelity versus cost of SURF composed with acceleration plug-ins, on the toy world (issue 15).

Every method runs on the same (caption, seed) clips in one process, batch by batch, in an order rotated per
batch, so the measured wall times compare (the machine is shared: only ratios within this run mean anything).
The reference is the base model's own plain native run (its pipeline's scheduler, every step, CFG).
Methods: `baseline` (that run, timed), `baseline+cache` (diffusers' FirstBlockCache on the base model),
`surf` (pool@switch preview + Refiner), `surf+cache`, `surf+cfg-low` (no CFG in the low-resolution steps),
`surf+cache+cfg-low`, `surf+cfg-stop` (no CFG from step --cfg-stop on), `surf+cache+cfg-stop`, `surf@<steps>`
(fewer base-model steps, the switch scaled). Metrics per clip as in
surf_train.evaluate (caption match of colour, shape and direction, object position error against the
reference, PSNR on the preview grid); paired differences against `surf` get 95% bootstrap intervals over clips,
the wall-time ratio `surf / method` one over batches. GFLOPs are those of the work actually done (the Meter:
forwards made, blocks the cache skipped left out). Writes accel.json, accel.md and accel.png to --out-dir.

    python -m surf_train.evaluate_accel --n 128 --out-dir benchmarks/results/accel   # the shipped table
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from surf_train import TOY_REFINER
from surf_train.base import Acceleration, BaseSpec, latent_frames, load_base_model
from surf_train.common.cli_args import add_fields, from_args
from surf_train.common.errors import ConfigError
from surf_train.evaluate import _clip_metrics, bootstrap_ci

METRICS = ("all3", "pos_err", "psnr_lo")


@dataclass
class AccelEvalConfig:
    base: str = "toy"  # base model in conf/base with a toy-world caption grammar
    refiner: str = str(TOY_REFINER)  # exported Refiner directory (default: the shipped toy-world one)
    n: int = 64  # (caption, seed) pairs
    seed: int = 0  # noise seed of the first clip
    steps: int = 20  # base-model sampling steps
    switch: int = 5  # switch step of SURF's preview
    rule: str = "pool"  # re-noise rule of SURF's preview
    cache_threshold: float = 0.2  # from 16- and 32-clip trials: 0.1 skips 19% of blocks, 0.3 moves the object
    cfg_stop: int = 8  # CFG truncation by step: no CFG from this step on (16-clip trials of 8 and 12)
    fewer_steps: int = 10  # steps of the fewer-steps baseline
    batch: int = 8  # clips per batch
    bootstrap: int = 2000  # bootstrap resamples for the intervals
    out_dir: str = "outputs/evaluate_accel"  # where accel.json, accel.md and the plot go
    progress: bool = True
    methods: list[str] = field(default_factory=list)  # a subset (baseline and surf always run); empty: all

    def check(self) -> None:
        if self.n < 2 or self.batch < 1:
            raise ConfigError(f"--n must be at least 2 (got {self.n}) and --batch at least 1 (got {self.batch})")
        if (
            not 0 < self.switch < self.steps
            or not 1 <= self.fewer_steps <= self.steps
            or not 0 <= self.cfg_stop <= self.steps
        ):
            raise ConfigError(
                f"need 0 < switch < steps, 1 <= fewer-steps <= steps and 0 <= cfg-stop <= steps; got "
                f"switch {self.switch}, steps {self.steps}, fewer-steps {self.fewer_steps}, "
                f"cfg-stop {self.cfg_stop}"
            )
        if not Path(self.refiner).is_dir():
            raise ConfigError(f"--refiner {self.refiner}: no exported Refiner there; run `make demo` first")


@dataclass(frozen=True)
class Method:
    name: str
    surf: bool  # preview + Refiner (else the native run)
    steps: int
    switch: int
    acc: Acceleration


def methods(cfg: AccelEvalConfig) -> list[Method]:
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


def evaluate_accel(cfg: AccelEvalConfig) -> dict:
    """Run every method on every clip; returns the summary (also written to cfg.out_dir)."""
    from surf_train.base.sampling import PreviewPlan, preview_sample, sample
    from surf_train.data.toyworld import all_captions, detect
    from surf_train.flops import metered_flops, refiner_flops, total
    from surf_train.models.loading import load_refiner
    from surf_train.models.sampler import RefinerSampler

    cfg.check()
    spec = BaseSpec.from_name(cfg.base)
    net, meta = load_refiner(cfg.refiner)
    sampler = RefinerSampler.from_bridge(meta.get("bridge", {}))
    model = load_base_model(spec, "cpu")
    frames, (h, w) = spec.native_frames, spec.native_size
    c, f_lat = spec.channels, latent_frames(frames, spec.stride_t)
    hi, lo = (h // spec.stride_s, w // spec.stride_s), (h // spec.stride_s // 2, w // spec.stride_s // 2)
    text_len = spec.max_sequence_length if net.cfg.text_dim else 0
    refine_flops = sampler.steps * total(refiner_flops(net.cfg, (c, f_lat, *hi), text_len))
    caps = all_captions()
    prompts = [caps[(7 * i) % len(caps)] for i in range(cfg.n)]
    ms = methods(cfg)
    per = {m.name: [] for m in ms}
    seconds = {m.name: [] for m in ms}  # per batch
    blocks = {m.name: [] for m in ms}
    for bi, i0 in enumerate(tqdm(range(0, cfg.n, cfg.batch), desc="accel", unit="batch", disable=not cfg.progress)):
        ps = prompts[i0 : i0 + cfg.batch]
        gens = [torch.Generator().manual_seed(cfg.seed + i0 + j) for j in range(len(ps))]
        noise = torch.stack([torch.randn(c, f_lat, *hi, generator=g) for g in gens])
        fresh = torch.stack([torch.randn(c, f_lat, *lo, generator=g) for g in gens])
        cond = model.encode_prompt(ps)
        text = cond.embeds.float() if net.cfg.text_dim else None
        latents, gflops = {}, {}
        order = ms[bi % len(ms) :] + ms[: bi % len(ms)]  # rotated: no method always runs first or last
        for m in order:
            model.accelerate(m.acc)
            model.meter.reset()
            vel = model.velocity_fn(cond, None, m.acc)
            t0 = time.perf_counter()
            with torch.no_grad():
                if not m.surf:
                    x = sample(vel, noise, model.schedule(m.steps))
                else:
                    plan = PreviewPlan(model.schedule(m.steps), switch=m.switch, preview_size=lo, rule=cfg.rule)
                    pre = preview_sample(vel, noise, plan, fresh)
                    x = sampler(net, pre, hi, text, gens[0])
            seconds[m.name].append(time.perf_counter() - t0)
            latents[m.name] = x
            lat = {hw: (c, f_lat, *hw) for hw in model.meter.forwards}
            done = sum(
                metered_flops(
                    spec.family,
                    model.pipe.transformer.config,
                    lat,
                    model.meter.forwards,
                    model.meter.blocks,
                    spec.max_sequence_length,
                ).values()
            )
            gflops[m.name] = (done / len(ps) + (refine_flops if m.surf else 0)) / 1e9  # per clip
            blocks[m.name].append(model.meter.block_fraction(None, model.block_lists))
        model.accelerate(Acceleration())
        videos = {name: model.vae_decode(x) for name, x in latents.items()}
        for j, p in enumerate(ps):
            ref = videos["baseline"][j]
            ref_det = detect(ref)
            for m in ms:
                row = _clip_metrics(videos[m.name][j], ref, ref_det, p, (h // 2, w // 2))
                per[m.name].append({**row, "gflops": gflops[m.name]})
    result = summarise(cfg, ms, per, seconds, blocks)
    write_outputs(cfg, result)
    return result


def summarise(cfg: AccelEvalConfig, ms: list[Method], per: dict, seconds: dict, blocks: dict) -> dict:
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
            d = arr[k] - np.array([r[k] for r in per["surf"]])
            lo, hi = bootstrap_ci(d, cfg.bootstrap)
            row[f"{k}_minus_surf"] = round(float(d.mean()), 4)
            row[f"{k}_minus_surf_ci95"] = [round(lo, 4), round(hi, 4)]
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


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"N = {result['n']} (caption, seed) pairs, base `{cfg['base']}`, {cfg['steps']} steps; SURF = Refiner on "
        f"`{cfg['rule']}@{cfg['switch']}`; cache = FirstBlockCache threshold {cfg['cache_threshold']}. "
        f"Reference: the plain native run. Wall time measured in this one run (batches of {cfg['batch']}, "
        f"methods in rotated order); intervals are 95% bootstrap (clips; batches for the time ratio).",
        "",
        "| method | all 3 match | vs surf | shape | direction | position err | vs surf | PSNR@preview dB | blocks run "
        "| GFLOPs/clip | ms/clip | speedup vs surf | meets bar |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
    rows = {k: r for k, r in result["methods"].items() if k.startswith(("surf+", "surf@"))}
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
    lines += [
        "",
        "Bar (>= 1.5x less wall time than surf, caption match within 0.05 and position error within 0.01 of "
        "it): "
        + (
            f"met by {', '.join(met)}."
            if met
            else f"not met. At >= 1.5x: {', '.join(fast) or 'none'}. Within both fidelity limits: "
            f"{', '.join(faithful) or 'none'}."
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(cfg: AccelEvalConfig, result: dict) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("accel.json", json.dumps(result, indent=1)), ("accel.md", format_table(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot(result, out / "accel.png")


def parse_args(argv: list[str] | None = None) -> AccelEvalConfig:
    ap = argparse.ArgumentParser(
        prog="python -m surf_train.evaluate_accel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_fields(ap, AccelEvalConfig, methods={"nargs": "*"})
    return from_args(AccelEvalConfig, ap.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        result = evaluate_accel(cfg)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(result))
    print(f"wrote {cfg.out_dir}/accel.md, accel.json and accel.png")


if __name__ == "__main__":
    main()
