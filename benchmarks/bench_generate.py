"""End-to-end generation on CPU: wall time of `surf` versus `baseline` against the FLOPs-predicted speedup.

    .venv/bin/python benchmarks/bench_generate.py [--repeats 5] [--threads 1]

Runs `surf_train.generate.generate_one` (surf-generate's per-video code over a SurfPipeline loaded once) for both
modes on the `toy` base model
(a ~1M-parameter Wan 2.1-architecture transformer with CFG) at a target where its transformer
dominates the baseline: 96x96x5 by default (token grid 5x24x24 = 2880 tokens; at the toy's native
32x32 a call is only 320 tokens). Sizes keep the paper's ratios: the prefix at 2/3 of the target
side (480p for 720p), the preview at 1/3 (240p for 720p). Same steps in both modes (the paper's 40,
switch 10), 10 Refiner steps. The Refiner has random weights (timing does not depend on training),
about 1/12 of the base transformer's parameters (paper: ~1B for the 14B base) with a window smaller
than the grid.

Measured per run: the reports' per-stage seconds and analytic FLOPs, plus wall time around generate_one()
with the mp4 write and the sampler and upsampling spans read from its StageClock (model loading timed once).
"Generation" time is
text encoding to decoded frames: the report stages plus the glue between them (noise, reshift
resampling, upsampling). Modes alternate order in each repeat; medians over repeats.

Outputs benchmarks/results/generate.json and generate.md. Torch runs on --threads intra-op threads
(default 1: on a shared 2-core machine, 2 threads under load make small calls many times slower
through spin-waiting; --thread-check measures that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import surf_train.generate as G
from surf_train.base import load_base_model
from surf_train.cost import total, wan_flops
from surf_train.models.loading import load_refiner
from surf_train.models.refiner import Refiner, RefinerConfig, num_params
from surf_train.training.export import save_refiner

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling across a wooden floor"


def one_run(cfg: G.GenerateConfig, pipe) -> dict:
    """One video through surf-generate's own code (generate_one) with the pipeline loaded once."""
    load = os.getloadavg()[0]
    t = time.perf_counter()
    rep, clock = G.generate_one(cfg, pipe, 0, cfg.prompts[0], cfg.seeds[0])
    wall = time.perf_counter() - t
    ts, st = clock.spans, rep["seconds"]
    net = sum(st.get(k, 0.0) for k in ("full_res", "prefix", "low_res"))
    gen = wall - ts.get("mp4", 0.0)
    row = {
        "mode": cfg.mode,
        "wall_s": wall,
        "generation_s": gen,
        "load_s": 0.0,
        "mp4_s": ts.get("mp4", 0.0),
        "stages_s": st,
        "calls": rep["calls"],
        "flops": rep["flops"],
        # time inside the sampler that is not a network call: reshift resampling, noise gain, scheduler steps
        "sampler_glue_s": ts.get("sampler", 0.0) - net,
        "upsample_s": ts.get("upsample", 0.0),
        "loadavg_1m": load,
    }
    row["other_s"] = gen - sum(st.values()) - row["sampler_glue_s"] - row["upsample_s"]
    return row


def med(rows, fn):
    return statistics.median(fn(r) for r in rows)


def decode_gflops(model, latent) -> float:
    """Matmul/conv FLOPs of the base model's VAE decode, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    vae = model.pipe.vae
    with torch.device("meta"):
        mv = type(vae).from_config(vae.config)
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        mv.decode(torch.empty(1, *latent, device="meta"), return_dict=False)
    return c.get_total_flops() / 1e9


def paper_shape() -> dict:
    """The same comparison for Wan 2.1 14B at 1280x720x81 from surf_train.flops (40 vs 10+30 steps, with decode)."""
    from surf_train.cost import RunSettings, run_costs

    r = run_costs(RunSettings(steps=40, surf_steps=40, switch=10, vae=True))
    st = {(x["run"], x["stage"]): x for x in r["stages"]}
    dec = st[("surf", "vae_decode")]["pflops"]
    call = st[("baseline", "base")]["tflops_per_call"] * 2 / 1e3  # guided call, PFLOPs
    return {
        "baseline_pflops_with_decode": r["baseline_pflops"],
        "surf_pflops_with_decode": r["surf_pflops"],
        "decode_pflops": dec,
        "speedup_without_decode": (r["baseline_pflops"] - dec) / (r["surf_pflops"] - dec),
        "speedup_with_decode": r["speedup"],
        "decode_in_guided_calls": dec / call,
        "decode_share_of_surf": dec / r["surf_pflops"],
    }


def thread_check(model, latent, threads, reps=3) -> dict:
    """Seconds per guided base-model call on `latent` at each thread count (median of reps)."""
    cond = model.encode_prompt([PROMPT])
    x = torch.randn(1, *latent)
    old, out = torch.get_num_threads(), {}
    for n in threads:
        torch.set_num_threads(n)
        model.velocity(x, 0.5, cond)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            model.velocity(x, 0.5, cond)
            ts.append(time.perf_counter() - t)
        out[str(n)] = statistics.median(ts)
    torch.set_num_threads(old)
    return out


def size(text: str) -> tuple[int, int]:
    """'384' or '384x384' (height x width) -> (h, w)."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def window(text: str) -> tuple[int, int, int]:
    w = tuple(int(v) for v in text.split(","))
    if len(w) != 3:
        raise argparse.ArgumentTypeError("window must be wt,wh,ww")
    return w  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="toy", help="base model in conf/base (default toy)")
    ap.add_argument("--target", type=size, default=(96, 96), help="target HxW pixels (default 96x96)")
    ap.add_argument("--prefix", type=size, default=(64, 64), help="prefix HxW (default 64: 2/3, as 480p/720p)")
    ap.add_argument("--preview", type=size, default=(32, 32), help="preview HxW (default 32: 1/3, as 240p/720p)")
    ap.add_argument("--frames", type=int, default=5, help="frames (default 5 -> 5 latent frames)")
    ap.add_argument("--steps", type=int, default=40, help="base-model steps, both modes (default 40)")
    ap.add_argument("--switch", type=int, default=10, help="SURF steps at the prefix size (default 10)")
    ap.add_argument("--refiner-steps", type=int, default=10)
    ap.add_argument("--rule", default="paper", choices=G.RULES, help="re-noise rule (default paper, generate's)")
    ap.add_argument("--guidance", type=float, help="CFG scale (default: the base model's; toy 2.5 = CFG on)")
    ap.add_argument("--refiner-dim", type=int, default=32)
    ap.add_argument("--refiner-depth", type=int, default=4)
    ap.add_argument("--refiner-heads", type=int, default=2)
    ap.add_argument("--refiner-mlp-ratio", type=float, default=3.0)
    ap.add_argument("--window", type=window, default=(2, 8, 8), help="Refiner window in tokens (default 2,8,8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--compile",
        action="store_true",
        help="regional compilation of the base transformer and the Refiner (surf-generate --compile); compiled in "
        "the warm-up runs",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    ap.add_argument(
        "--no-thread-check",
        dest="thread_check",
        action="store_false",
        help="skip timing a preview-size call at 1 and 2 threads",
    )
    ap.add_argument("--out", default="benchmarks/results/generate.json", help="JSON output (.md next to it)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    os.chdir(ROOT)
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    spec = G.BaseSpec.from_name(a.base)
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))

    t = time.perf_counter()
    model = load_base_model(spec, "cpu")  # once: every run reuses it
    load_once = time.perf_counter() - t
    text_dim = model.pipe.transformer.config.text_dim
    rcfg = RefinerConfig(
        in_channels=spec.channels,
        dim=a.refiner_dim,
        depth=a.refiner_depth,
        heads=a.refiner_heads,
        mlp_ratio=a.refiner_mlp_ratio,
        window=a.window,
        text_dim=text_dim,
    )
    net = Refiner.from_cfg(rcfg)  # random weights (DiT zero-init of gates and output: same compute)
    ref_dir = save_refiner(net.state_dict(), rcfg, work / "refiner", bridge={"steps": a.refiner_steps})
    loaded, meta = load_refiner(ref_dir)  # as surf-generate loads it
    pipe = G.SurfPipeline.from_base(model, loaded, meta["bridge"])
    if a.compile:
        pipe.compile_repeated_blocks()
    (work / "out").mkdir()
    base_params = num_params(model.pipe.transformer)

    def cfg(mode, **kw):
        d = dict(
            base=a.base,
            refiner=str(ref_dir),
            mode=mode,
            prompts=[PROMPT],
            seeds=[0],
            height=a.target[0],
            width=a.target[1],
            frames=a.frames,
            prefix_height=a.prefix[0],
            prefix_width=a.prefix[1],
            preview_height=a.preview[0],
            preview_width=a.preview[1],
            steps=a.steps,
            switch=a.switch,
            rule=a.rule,
            guidance=a.guidance,
            refiner_steps=a.refiner_steps,
            device="cpu",
            out_dir=str(work / "out"),
            progress=False,
        )
        d.update(kw)
        return G.GenerateConfig(**d)

    geo = model.geometry
    lat = {
        k: geo.latent_shape(a.frames, *v)
        for k, v in (("target", a.target), ("prefix", a.prefix), ("preview", a.preview))
    }
    threads = thread_check(model, lat["preview"], sorted({1, 2, a.threads})) if a.thread_check else {}
    print(f"threads check (s per call at preview {a.preview}): {threads}", file=sys.stderr)

    # warm-up at the benchmark's shapes (few steps), then interleaved repeats
    for mode in ("baseline", "surf"):
        one_run(cfg(mode, steps=2, switch=1, refiner_steps=1), pipe)
    runs = {"baseline": [], "surf": []}
    for r in range(a.repeats):
        order = ("baseline", "surf") if r % 2 == 0 else ("surf", "baseline")
        for mode in order:
            row = one_run(cfg(mode), pipe)
            row["repeat"] = r
            runs[mode].append(row)
            print(
                f"repeat {r} {mode:8s} generation {row['generation_s']:.2f}s stages "
                f"{ {k: round(v, 2) for k, v in row['stages_s'].items()} } load {row['loadavg_1m']:.1f}",
                file=sys.stderr,
            )

    B, S = runs["baseline"], runs["surf"]
    fb, fs = B[0]["flops"]["total"], S[0]["flops"]["total"]
    predicted = fb / fs
    stage = lambda rows, k: med(rows, lambda r: r["stages_s"].get(k, 0.0))  # noqa: E731
    gen_b, gen_s = med(B, lambda r: r["generation_s"]), med(S, lambda r: r["generation_s"])
    dec_b, dec_s = stage(B, "decode"), stage(S, "decode")
    text_b, text_s = stage(B, "text"), stage(S, "text")
    net_b = stage(B, "full_res")
    net_s = stage(S, "prefix") + stage(S, "low_res") + stage(S, "refine")
    measured = gen_b / gen_s
    speedups = {
        "predicted_flops": predicted,
        "measured": measured,
        "measured_per_repeat_median": statistics.median(b["generation_s"] / s["generation_s"] for b, s in zip(B, S)),
        "excluding_decode": (gen_b - dec_b) / (gen_s - dec_s),
        "excluding_decode_and_text": (gen_b - dec_b - text_b) / (gen_s - dec_s - text_s),
        "network_calls_only": net_b / net_s,
    }
    ratio = {k: v / predicted for k, v in speedups.items() if k != "predicted_flops"}

    # Additive decomposition of SURF's excess over the predicted time gen_b / predicted: every SURF
    # item gets a budget of its FLOPs at the baseline's seconds per FLOP (gen_b / fb); items without
    # counted FLOPs (text, decode, glue) get none. Excesses sum to gen_s - gen_b / predicted.
    per_flop = gen_b / fb
    items = {
        "prefix": stage(S, "prefix"),
        "low_res": stage(S, "low_res"),
        "refine": stage(S, "refine"),
        "text": text_s,
        "decode": dec_s,
        "sampler_glue": med(S, lambda r: r["sampler_glue_s"]),
        "upsample": med(S, lambda r: r["upsample_s"]),
        "other": med(S, lambda r: r["other_s"]),
    }
    item_flops = {k: S[0]["flops"].get(k, 0) for k in items}
    gap = {
        k: {
            "seconds": v,
            "gflops": item_flops[k] / 1e9,
            "budget_s": item_flops[k] * per_flop,
            "excess_s": v - item_flops[k] * per_flop,
        }
        for k, v in items.items()
    }
    target_time = gen_b / predicted
    # throughput per network stage: GFLOP/s, shows per-call overhead at small sizes
    rate = {"full_res": fb / 1e9 / net_b}
    for k in ("prefix", "low_res", "refine"):
        rate[k] = S[0]["flops"][k] / 1e9 / stage(S, k)
    dec_gf = decode_gflops(model, lat["target"])
    paper = paper_shape()

    res = {
        "benchmark": "surf vs baseline generation wall time on CPU (surf_train.generate)",
        "command": (
            "cd "
            + str(ROOT)
            + " && .venv/bin/python benchmarks/bench_generate.py "
            + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
        ).rstrip(),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": a.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_1m_per_run": [r["loadavg_1m"] for r in B + S],
            "note": "2 cores shared with other jobs; modes interleaved (order alternates), medians",
        },
        "thread_check_s_per_call_preview": threads,
        "settings": {
            "base": a.base,
            "target": a.target,
            "prefix": a.prefix,
            "preview": a.preview,
            "frames": a.frames,
            "latent": lat,
            "steps": a.steps,
            "switch": a.switch,
            "refiner_steps": a.refiner_steps,
            "rule": a.rule,
            "guidance": a.guidance if a.guidance is not None else spec.guidance,
            "repeats": a.repeats,
            "compile": a.compile,
            "refiner": rcfg.to_dict(),
            "tokens": {k: v[1] * (v[2] // spec.patch_s) * (v[3] // spec.patch_s) for k, v in lat.items()},
            "base_transformer_params": base_params,
            "refiner_params": num_params(net),
            "base_over_refiner_params": base_params / num_params(net),
        },
        "calls": {"baseline": B[0]["calls"], "surf": S[0]["calls"]},
        "flops": {
            "baseline": B[0]["flops"],
            "surf": S[0]["flops"],
            "decode_gflops_not_in_reports": dec_gf,
            "one_base_call_gflops_target": total(
                wan_flops(model.pipe.transformer.config, lat["target"], spec.max_sequence_length)
            )
            * 2
            / 1e9,
        },
        "median_s": {
            mode: {
                "generation": med(rows, lambda r: r["generation_s"]),
                "wall_incl_load_mp4": med(rows, lambda r: r["wall_s"]),
                "mp4_write": med(rows, lambda r: r["mp4_s"]),
                "sampler_glue": med(rows, lambda r: r["sampler_glue_s"]),
                "upsample": med(rows, lambda r: r["upsample_s"]),
                "other": med(rows, lambda r: r["other_s"]),
                **{k: stage(rows, k) for k in rows[0]["stages_s"]},
            }
            for mode, rows in runs.items()
        },
        "gflops_per_s": rate,
        "decode_gflops_per_s": dec_gf / dec_b,
        "decode_in_guided_target_calls": {
            "flops": dec_gf * 1e9 / (fb / B[0]["calls"]["full_res"]),
            "seconds": dec_b / (net_b / B[0]["calls"]["full_res"]),
        },
        "paper_shape_flops": paper,
        "speedup": speedups,
        "measured_over_predicted": ratio,
        "target_measured_over_predicted": 0.8,
        "meets_target": ratio["measured"] >= 0.8,
        "surf_gap": {
            "surf_generation_s": gen_s,
            "surf_time_at_predicted_speedup_s": target_time,
            "excess_s": gen_s - target_time,
            "items": gap,
        },
        "runs": runs,
        "model_load_s_once": load_once,
        "bench_seconds": time.perf_counter() - t_start,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=list) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    shutil.rmtree(work, ignore_errors=True)  # the Refiner and the videos
    print(f"wrote {out} and {out.with_suffix('.md')} in {res['bench_seconds']:.0f}s")
    print(f"rerun: {res['command']}")


def markdown(r: dict) -> str:
    s, m, sp, q = r["settings"], r["median_s"], r["speedup"], r["measured_over_predicted"]
    fb, fsu = r["flops"]["baseline"], r["flops"]["surf"]
    hw = lambda v: f"{v[0]}x{v[1]}"  # noqa: E731
    L = [
        "# Generation benchmark: SURF vs baseline on CPU",
        "",
        f"Base `{s['base']}` (Wan architecture, {s['base_transformer_params'] / 1e6:.2f}M transformer params, "
        f"CFG {s['guidance']}), target {hw(s['target'])}x{s['frames']} ({s['tokens']['target']} tokens), "
        f"prefix {hw(s['prefix'])} ({s['tokens']['prefix']} tokens), preview {hw(s['preview'])} "
        f"({s['tokens']['preview']} tokens); {s['steps']} steps, switch {s['switch']}, rule `{s['rule']}`, "
        f"{s['refiner_steps']} Refiner steps. Refiner (random weights): dim {s['refiner']['dim']}, depth "
        f"{s['refiner']['depth']}, window {s['refiner']['window']}, {s['refiner_params'] / 1e3:.0f}k params "
        f"(base/Refiner = {s['base_over_refiner_params']:.1f}; paper ~14). {s['repeats']} repeats, modes "
        f"interleaved, medians; torch threads {r['machine']['torch_threads']}, 1-min load average "
        f"{min(r['machine']['loadavg_1m_per_run']):.1f}-{max(r['machine']['loadavg_1m_per_run']):.1f} "
        f"on {r['machine']['cpus']} shared cores."
        + (" Regional compilation on (`--compile`): base transformer and Refiner blocks." if s.get("compile") else ""),
        "",
        "| stage | baseline s | calls | GFLOPs | SURF s | calls | GFLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    cb, cs = r["calls"]["baseline"], r["calls"]["surf"]
    for k in ("text", "full_res", "prefix", "low_res", "refine", "sampler_glue", "upsample", "decode", "other"):
        vb, vs = m["baseline"].get(k), m["surf"].get(k)
        if vb is None and vs is None:
            continue
        ncs = s["refiner_steps"] if k == "refine" else cs.get(k, "")

        def gf(f, key):
            return f"{f[key] / 1e9:.1f}" if key in f else ""

        L.append(
            f"| {k} | {'' if vb is None else f'{vb:.2f}'} | {cb.get(k, '')} | {gf(fb, k)} | "
            f"{'' if vs is None else f'{vs:.2f}'} | {ncs} | {gf(fsu, k)} |"
        )
    L += [
        f"| **generation** | **{m['baseline']['generation']:.2f}** | | **{fb['total'] / 1e9:.1f}** | "
        f"**{m['surf']['generation']:.2f}** | | **{fsu['total'] / 1e9:.1f}** |",
        "",
    ]
    L += [
        "| speedup | value | / predicted |",
        "|---|---|---|",
        f"| predicted by FLOPs (reports) | {sp['predicted_flops']:.2f}x | 1.00 |",
    ]
    names = {
        "measured": "**measured, generation (text to decoded frames)**",
        "measured_per_repeat_median": "measured, median of per-repeat ratios",
        "excluding_decode": "measured, excluding VAE decode",
        "excluding_decode_and_text": "measured, excluding decode and text encoding",
        "network_calls_only": "measured, network calls only (base + Refiner)",
    }
    for k, name in names.items():
        L.append(f"| {name} | {sp[k]:.2f}x | {q[k]:.2f} |")
    g = r["surf_gap"]
    L += [
        "",
        f"Target measured >= 0.8 x predicted: **{'met' if r['meets_target'] else 'not met'}** ({q['measured']:.2f}).",
        "",
        f"Where SURF's time goes beyond its FLOPs share: at the predicted speedup SURF would take "
        f"{g['surf_time_at_predicted_speedup_s']:.2f}s, it takes {g['surf_generation_s']:.2f}s "
        f"(excess {g['excess_s']:.2f}s). Each item's budget is its FLOPs at the baseline's seconds per FLOP.",
        "",
        "| SURF item | seconds | GFLOPs | budget s | excess s | share of excess |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in sorted(g["items"].items(), key=lambda kv: -kv[1]["excess_s"]):
        L.append(
            f"| {k} | {v['seconds']:.2f} | {v['gflops']:.2f} | {v['budget_s']:.2f} | {v['excess_s']:.2f} | "
            f"{v['excess_s'] / g['excess_s']:.0%} |"
        )
    rate = r["gflops_per_s"]
    L += [
        "",
        "Throughput (GFLOP/s, matmul FLOPs of the reports): "
        + ", ".join(f"{k} {v:.1f}" for k, v in rate.items())
        + f"; VAE decode {r['decode_gflops_per_s']:.1f} "
        f"({r['flops']['decode_gflops_not_in_reports']:.1f} GFLOPs per decode, not in the reports, vs "
        f"{r['flops']['one_base_call_gflops_target']:.1f} per guided base call at the target).",
        "",
    ]
    d, ps = r["decode_in_guided_target_calls"], r["paper_shape_flops"]
    top = max(g["items"].items(), key=lambda kv: kv[1]["excess_s"])
    ms = r["median_s"]["surf"]
    L += [
        "## Conclusion",
        "",
        f"- Measured {sp['measured']:.2f}x against {sp['predicted_flops']:.2f}x predicted by the reports' FLOPs "
        f"({q['measured']:.2f} of predicted): the 0.8 target is "
        f"{'met' if r['meets_target'] else 'not met'} end to end. "
        f"Without the VAE decode it is {sp['excluding_decode']:.2f}x ({q['excluding_decode']:.2f} of predicted), "
        f"network calls alone {sp['network_calls_only']:.2f}x ({q['network_calls_only']:.2f}).",
        f"- Largest part of SURF's excess over its predicted time: {top[0]} ({top[1]['excess_s']:.2f}s of "
        f"{g['excess_s']:.2f}s). The decode is the same in both runs ({ms['decode']:.2f}s, "
        f"{ms['decode'] / ms['generation']:.0%} of SURF's time) and the reports do not count it. The toy's VAE "
        f"(3 base channels, convolutions at full pixel resolution) does "
        f"{r['flops']['decode_gflops_not_in_reports']:.1f} GFLOPs ({d['flops']:.2f} of a guided target call) "
        f"at {r['decode_gflops_per_s']:.1f} GFLOP/s, so it costs "
        f"the time of {d['seconds']:.1f} guided target calls. For Wan 2.1 14B at 1280x720x81 the decode is "
        f"{ps['decode_pflops']:.2f} PFLOPs = {ps['decode_in_guided_calls']:.2f} of a guided call and "
        f"{ps['decode_share_of_surf']:.1%} of SURF's FLOPs (40-step speedup {ps['speedup_without_decode']:.2f}x "
        f"without decode, {ps['speedup_with_decode']:.2f}x with it): the toy exaggerates the decode's weight.",
        f"- Per-call overhead at small sizes, at {r['machine']['torch_threads']} thread(s): {rate['low_res']:.0f} "
        f"GFLOP/s for the "
        f"{s['tokens']['preview']}-token preview calls and {rate['prefix']:.0f} for the prefix against "
        f"{rate['full_res']:.0f} at the target. The Refiner runs at {rate['refine']:.0f} GFLOP/s "
        f"({1 - rate['refine'] / rate['full_res']:.0%} of its time is beyond its matmul FLOPs at the target's "
        f"rate: at width {s['refiner']['dim']} narrow matmuls and uncounted elementwise work such as RoPE, norms "
        f"and window partitioning dominate); it is {ms['refine'] / ms['generation']:.0%} of SURF's time. "
        f"Reshift resampling and "
        f"Euler updates {ms['sampler_glue']:.3f}s, upsampling {ms['upsample']:.3f}s, text encoding "
        f"{ms['text']:.3f}s, the rest of generate_one() (noise, frames to numpy, FLOPs, report) {ms['other']:.3f}s.",
        "",
    ]
    if r["thread_check_s_per_call_preview"]:
        L.append(
            "Threads check, seconds per guided call at the preview size: "
            + ", ".join(f"{k} thread(s) {v * 1000:.0f} ms" for k, v in r["thread_check_s_per_call_preview"].items())
            + "."
        )
        L.append("")
    L += [
        f"Size: at {s['target'][0]}x{s['target'][1]}x{s['frames']} the baseline's transformer is "
        f"{r['median_s']['baseline']['full_res'] / r['median_s']['baseline']['generation']:.0%} of its time; "
        f"a guided "
        f"call at the {s['preview'][0]}x{s['preview'][1]} preview size is "
        f"{r['flops']['surf']['low_res'] / r['calls']['surf']['low_res'] / 1e9:.1f} GFLOPs against "
        f"{r['flops']['one_base_call_gflops_target']:.1f} at the target.",
        "",
        f"Rerun: `{r['command']}`",
        "",
    ]
    return "\n".join(L)


if __name__ == "__main__":
    main()
