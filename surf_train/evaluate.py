"""Signature-fidelity evaluation on the toy world: how close each cheap method stays to the base model.

For N (caption, seed) pairs the base model's native-resolution generation is the reference. Against it:
  direct      low-resolution generation from the same (area-downsampled) noise
  <rule>@<k>  noise-reshifting previews: k native steps, then the rest at preview size (paper, snr, pool)
  upsampled   the SURF preview upsampled to native size in latent space (trilinear)
  surf        that preview refined by the exported Refiner (K steps)
Metrics per clip: PSNR and SSIM against the reference (low-resolution outputs against the reference
area-downsampled to their size; identical clips score 99 dB), object position error against the reference's detected
centres (mean
over frames, fractions of the frame; a frame where only one of the two shows the object counts 0.5), colour /
shape / direction / background match with the caption, speed error against the reference, measured
seconds and analytic FLOPs per clip. Paired differences between methods get 95% bootstrap intervals
over clips. Writes results.json, table.md and fidelity_vs_cost.png to --out-dir.

    python -m surf_train.evaluate --n 64 --refiner runs/tiny/refiner
    python -m surf_train.evaluate --n 16 --refiner none --switches 2 5 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from surf_train.base import BaseModel, BaseSpec, latent_frames, load_base_model
from surf_train.cli_args import add_fields, from_args
from surf_train.errors import ConfigError
from surf_train.sampling import RULES, PreviewPlan, finish_preview, scheduler_steps

DEFAULT_REFINER = "runs/tiny/refiner"  # where `make demo` exports the Refiner
MISSING = 0.5  # position error of a frame where only one of the two clips shows the object
PSNR_CAP = 99.0  # identical clips (infinite PSNR) score this, so results stay plain JSON


@dataclass
class EvalConfig:
    base: str = "toy"  # base model in conf/base with a toy-world caption grammar
    refiner: str = DEFAULT_REFINER  # exported Refiner directory for `surf`, or 'none' (SURF left out)
    n: int = 32  # (caption, seed) pairs; captions cycle through the grammar
    seed: int = 0  # noise seed of the first clip
    steps: int = 20  # base-model sampling steps
    switches: list[int] = field(default_factory=lambda: [2, 5, 8, 12])  # switch steps k to compare
    rules: list[str] = field(default_factory=lambda: list(RULES))  # re-noise rules to compare
    surf_rule: str = "pool"  # preview rule SURF refines (match the pairs it was trained on)
    surf_switch: int = 5  # switch step of SURF's preview
    guidance: float | None = None  # CFG scale; None: the base model's
    refiner_steps: int | None = None  # Refiner steps; None: the K stored with the export
    batch: int = 16  # clips per batch
    bootstrap: int = 2000  # bootstrap resamples for the intervals
    out_dir: str = "outputs/evaluate"  # where results.json, table.md and the plot go
    progress: bool = True

    def check(self) -> None:
        bad = [r for r in [*self.rules, self.surf_rule] if r not in RULES]
        if bad:
            raise ConfigError(f"unknown re-noise rule(s) {bad}; choose from {list(RULES)}")
        for k in [*self.switches, self.surf_switch]:
            if not 0 < k < self.steps:
                raise ConfigError(f"switch {k} must be in [1, steps-1={self.steps - 1}] (0 is `direct`)")
        if self.n < 2 or self.batch < 1:
            raise ConfigError(f"--n must be at least 2 (got {self.n}) and --batch at least 1 (got {self.batch})")


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


def _methods(cfg: EvalConfig) -> list[str]:
    names = ["reference", "direct", *[f"{r}@{k}" for k in cfg.switches for r in cfg.rules]]
    if f"{cfg.surf_rule}@{cfg.surf_switch}" not in names:
        names.append(f"{cfg.surf_rule}@{cfg.surf_switch}")
    return names + ["upsampled"] + (["surf"] if cfg.refiner != "none" else [])


def _clip_metrics(
    video: torch.Tensor, ref_video: torch.Tensor, ref_det, caption: str, preview_hw: tuple[int, int] | None = None
) -> dict[str, float]:
    """Metrics of one (3, F, h, w) clip against the (3, F, H, W) reference and its detection.

    `psnr` is on the clip's own grid; `psnr_lo` on the preview grid `preview_hw` (both area-pooled to
    it), so previews, upsampled and refined clips compare on one grid.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from surf_train.toyworld import detect

    ref = ref_video
    if ref.shape[-2:] != video.shape[-2:]:
        ref = F.adaptive_avg_pool3d(ref, video.shape[1:])  # the reference at this clip's size
    a, b = (v.transpose(0, 1).clamp(-1, 1) for v in (video, ref))  # (F, 3, h, w)
    det = detect(video)
    gap = np.linalg.norm(det.centres - ref_det.centres, axis=1)  # NaN where either is missing
    gap = np.where(np.isnan(det.centres[:, 0]) & np.isnan(ref_det.centres[:, 0]), 0.0, gap)  # both: agree
    m = det.matches(caption)
    psnr = lambda x, y: min(PSNR_CAP, float(peak_signal_noise_ratio(x, y, data_range=2.0)))
    pool = lambda x: F.adaptive_avg_pool2d(x, preview_hw or x.shape[-2:])
    return {
        "psnr": psnr(a, b),
        "psnr_lo": psnr(pool(a), pool(b)),
        "ssim": float(structural_similarity_index_measure(a, b, data_range=2.0, kernel_size=7, sigma=1.0)),
        "pos_err": float(np.where(np.isnan(gap), MISSING, gap).mean()),
        **{k: float(v) for k, v in m.items()},
        "all3": float(m["colour"] and m["shape"] and m["direction"]),
        "speed_err": abs(det.speed - ref_det.speed),
    }


def _call_flops(model: BaseModel, lat_shape: tuple[int, ...], guidance: float | None) -> int:
    from surf_train.flops import total, wan_flops

    if model.spec.family != "wan":
        raise ConfigError(
            f"the evaluation's FLOPs model covers Wan-family base models; {model.spec.name} is {model.spec.family}"
        )
    g = model.spec.guidance if guidance is None else guidance
    return (2 if g != 1.0 else 1) * total(
        wan_flops(model.pipe.transformer.config, lat_shape, model.spec.max_sequence_length)
    )


def evaluate(cfg: EvalConfig) -> dict:
    """Run every method on every clip; returns the summary (also written to cfg.out_dir)."""
    from surf_train.export import check_base, load_refiner
    from surf_train.flops import refiner_flops, total
    from surf_train.objective import refine, upsample
    from surf_train.toyworld import all_captions, detect

    cfg.check()
    spec = BaseSpec.from_name(cfg.base)
    net, bridge = None, {}
    if cfg.refiner != "none":
        if not Path(cfg.refiner).is_dir():
            raise ConfigError(
                f"--refiner {cfg.refiner}: no exported Refiner there; run `make demo` (or "
                f"python -m surf_train.export) first, or pass --refiner none"
            )
        net, meta = load_refiner(cfg.refiner)
        bridge = meta.get("bridge", {})
        warning = check_base(meta, spec, f"Refiner {cfg.refiner}")
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    model = load_base_model(spec, "cpu")
    frames, (h, w) = spec.native_frames, spec.native_size
    c, f_lat = spec.channels, latent_frames(frames, spec.stride_t)
    hi, lo = (h // spec.stride_s, w // spec.stride_s), (h // spec.stride_s // 2, w // spec.stride_s // 2)
    preview_px = (h // 2, w // 2)
    spec.geometry.check(frames, *preview_px, "preview")
    k_ref = cfg.refiner_steps or bridge.get("steps", 10)
    schedule = model.schedule(cfg.steps)  # the base model's own scheduler, as its pipeline sets it
    flops_hi, flops_lo = (_call_flops(model, (c, f_lat, *s), cfg.guidance) for s in (hi, lo))
    caps = all_captions()
    prompts = [caps[(7 * i) % len(caps)] for i in range(cfg.n)]  # 7 is coprime to 72: no early repeats
    names = _methods(cfg)
    per: dict[str, list[dict]] = {m: [] for m in names}
    for i0 in tqdm(range(0, cfg.n, cfg.batch), desc="evaluate", unit="batch", disable=not cfg.progress):
        ps = prompts[i0 : i0 + cfg.batch]
        b = len(ps)
        gens = [torch.Generator().manual_seed(cfg.seed + i0 + j) for j in range(b)]
        noise = torch.stack([torch.randn(c, f_lat, *hi, generator=g) for g in gens])
        fresh = torch.stack([torch.randn(c, f_lat, *lo, generator=g) for g in gens])
        cond = model.encode_prompt(ps)
        vel = model.velocity_fn(cond, cfg.guidance)
        # reference: the full native run, keeping the latent at every switch step used below
        rec, x, kept = Recorder(vel), noise, {}
        wanted = set(cfg.switches) | {cfg.surf_switch}
        sched = schedule.start()
        for k in range(cfg.steps):
            if k in wanted:
                kept[k] = x
            x = scheduler_steps(rec, x, sched, 1, cfg.steps, start=k == 0)
        latents = {"reference": x}
        cost = {"reference": (rec.seconds(), cfg.steps * flops_hi)}
        # direct low-resolution generation = `pool` at switch 0: downsampled noise, resolution-shifted schedule
        for name, k, rule in (
            [("direct", 0, "pool")]
            + [(f"{r}@{k}", k, r) for k in cfg.switches for r in cfg.rules]
            + [(f"{cfg.surf_rule}@{cfg.surf_switch}", cfg.surf_switch, cfg.surf_rule)]
        ):
            if name in latents:
                continue
            plan = PreviewPlan(schedule, switch=k, preview_size=lo, rule=rule)
            r2 = Recorder(vel)
            latents[name] = finish_preview(r2, noise if k == 0 else kept[k], plan, fresh)
            n_lo = sum(1 for s, _ in r2.calls if s == lo)
            cost[name] = (
                rec.seconds(k) + r2.seconds(),
                k * flops_hi + n_lo * flops_lo + (len(r2.calls) - n_lo) * flops_hi,
            )
        surf_name = f"{cfg.surf_rule}@{cfg.surf_switch}"
        t0 = time.perf_counter()
        x_up = upsample(latents[surf_name], hi, bridge.get("up_mode", "bilinear"))
        latents["upsampled"] = x_up
        cost["upsampled"] = (cost[surf_name][0] + time.perf_counter() - t0, cost[surf_name][1])
        if net is not None:
            text = cond.embeds.float() if net.cfg.text_dim else None
            t0 = time.perf_counter()
            with torch.no_grad():
                latents["surf"] = refine(net, x_up, k_ref, float(bridge.get("sigma_aug_eval", 0.0)), text, gens[0])
            text_len = spec.max_sequence_length if net.cfg.text_dim else 0
            cost["surf"] = (
                cost["upsampled"][0] + time.perf_counter() - t0,
                cost[surf_name][1] + k_ref * total(refiner_flops(net.cfg, (c, f_lat, *hi), text_len)),
            )
        videos = {m: model.vae_decode(latents[m]) for m in names}
        for j, p in enumerate(ps):
            ref_det = detect(videos["reference"][j])
            for m in names:
                row = _clip_metrics(videos[m][j], videos["reference"][j], ref_det, p, preview_px)
                row.update(seconds=cost[m][0] / b, gflops=cost[m][1] / 1e9)
                per[m].append(row)
    result = summarise(cfg, per, names, prompts)
    write_outputs(cfg, result)
    return result


def bootstrap_ci(diff: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `diff` over resampled clips."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def comparisons(cfg: EvalConfig, names: list[str]) -> list[tuple[str, str, str]]:
    """(method a, method b, metric): the paired differences the README's questions need."""
    out = []
    rules = [r for r in RULES if r in cfg.rules]  # RULES order: each rule against every earlier one
    for k in cfg.switches:
        out += [(f"{r}@{k}", "direct", "pos_err") for r in cfg.rules]
        for b, a in itertools.combinations(rules, 2):
            out += [(f"{a}@{k}", f"{b}@{k}", m) for m in ("pos_err", "psnr")]
    if "surf" in names:
        out += [("surf", "upsampled", m) for m in ("psnr", "ssim", "pos_err")]
        out.append(("surf", f"{cfg.surf_rule}@{cfg.surf_switch}", "psnr_lo"))
    return out


def summarise(cfg: EvalConfig, per: dict[str, list[dict]], names: list[str], prompts: list[str]) -> dict:
    metrics = list(per[names[0]][0])
    arr = {m: {k: np.array([row[k] for row in per[m]]) for k in metrics} for m in names}
    methods = {m: {k: round(float(arr[m][k].mean()), 4) for k in metrics} for m in names}
    diffs = []
    for a, b, metric in comparisons(cfg, names):
        d = arr[a][metric] - arr[b][metric]
        lo, hi = bootstrap_ci(d, cfg.bootstrap)
        diffs.append(
            dict(
                a=a,
                b=b,
                metric=metric,
                mean=round(float(d.mean()), 4),
                ci95=[round(lo, 4), round(hi, 4)],
                separated=bool(lo > 0 or hi < 0),
            )
        )
    return {
        "config": asdict(cfg),
        "n": len(prompts),
        "methods": methods,
        "paired": diffs,
        "per_clip": {m: per[m] for m in names},
    }


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"N = {result['n']} (caption, seed) pairs, {cfg['steps']} steps, base `{cfg['base']}`; "
        f"SURF = Refiner on `{cfg['surf_rule']}@{cfg['surf_switch']}`. Position and speed errors are fractions "
        f"of the frame; match rates against the caption.",
        "",
        "PSNR and SSIM are on each method's own grid (previews at the preview size, against the reference "
        "area-pooled to it); PSNR@preview is every method and the reference area-pooled to the preview grid.",
        "",
        "| method | PSNR dB | PSNR@preview dB | SSIM | position err | colour | shape | direction | all 3 | speed err "
        "| GFLOPs | ms/clip |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, v in result["methods"].items():
        psnr, psnr_lo = ("ref", "ref") if m == "reference" else (f"{v['psnr']:.2f}", f"{v['psnr_lo']:.2f}")
        lines.append(
            f"| {m} | {psnr} | {psnr_lo} | {v['ssim']:.3f} | {v['pos_err']:.4f} | {v['colour']:.2f} | "
            f"{v['shape']:.2f} | {v['direction']:.2f} | {v['all3']:.2f} | {v['speed_err']:.4f} | {v['gflops']:.2f} | "
            f"{1000 * v['seconds']:.0f} |"
        )
    lines += [
        "",
        "Paired differences (a - b, mean over clips, 95% bootstrap interval; lower is better for position "
        "error, higher for PSNR/SSIM):",
        "",
        "| a | b | metric | mean | 95% CI | CI excludes 0 |",
        "|---|---|---|---|---|---|",
    ]
    for d in result["paired"]:
        lines.append(
            f"| {d['a']} | {d['b']} | {d['metric']} | {d['mean']:+.4f} | [{d['ci95'][0]:+.4f}, "
            f"{d['ci95'][1]:+.4f}] | {'yes' if d['separated'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Position error and PSNR versus GFLOPs per clip, one line per rule across switch steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, meth = result["config"], result["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in (
        (axes[0], "pos_err", "object position error (frac. of frame)"),
        (axes[1], "psnr_lo", "PSNR vs reference on the preview grid (dB)"),
    ):
        for r in cfg["rules"]:
            pts = sorted((meth[f"{r}@{k}"]["gflops"], meth[f"{r}@{k}"][metric], k) for k in cfg["switches"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"preview, {r}")
            for x, y, k in pts:
                ax.annotate(f"k={k}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        for m, style in (("direct", "ks"), ("upsampled", "c^"), ("surf", "r*")):
            if m in meth:
                ax.plot(meth[m]["gflops"], meth[m][metric], style, markersize=9, label=m)
        if metric == "pos_err":
            ax.plot(meth["reference"]["gflops"], 0.0, "gD", label="reference (native)")
        ax.set_xlabel("GFLOPs per clip")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Toy world: fidelity to the native generation vs cost (N={result['n']})")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(cfg: EvalConfig, result: dict) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(result, indent=1)), ("table.md", format_table(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot(result, out / "fidelity_vs_cost.png")


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    ap = argparse.ArgumentParser(
        prog="python -m surf_train.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_fields(ap, EvalConfig, rules={"help": f"re-noise rules to compare, from {list(RULES)}"})
    return from_args(EvalConfig, ap.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        result = evaluate(cfg)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(result))
    print(f"wrote {cfg.out_dir}/table.md, results.json and fidelity_vs_cost.png")


if __name__ == "__main__":
    main()
