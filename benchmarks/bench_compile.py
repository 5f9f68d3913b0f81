"""Regional compilation on CPU: seconds per Refiner step and per base-model call, compiled against eager.

    .venv/bin/python benchmarks/bench_compile.py [--repeats 5] [--threads 1]

Compiles the repeated blocks (`compile_repeated_blocks`: each transformer block is compiled once and the compiled
code reused by every block of the same class) of the Refiner and of the `toy` base model's transformer, at two
shapes: the toy's native 32x32x9 video (320 tokens per base call) and bench_generate.py's 96x96x5 target
(2880 tokens). The Refiner is bench_generate.py's (random weights, 1/12 of the base's parameters, window 2,8,8);
a Refiner step is one forward, a base-model call one guided velocity (two transformer forwards with CFG).

Per model and shape: eager and compiled seconds (median of `--repeats` after a warm-up), the compile time (the
first compiled call minus an eager call) and the largest difference between the compiled and the eager output
(float32), beside the largest |eager output|. Writes benchmarks/results/compile.json and compile.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from surf_train.base import BaseSpec, load_base_model
from surf_train.models.refiner import Refiner, RefinerConfig, num_params

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling across a wooden floor"
SHAPES = {"toy 32x32x9": (9, 32, 32), "target 96x96x5": (5, 96, 96)}  # (frames, height, width)


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` calls of fn() and its last output."""
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def compare(eager_fn, compiled_fn, repeats: int) -> dict:
    """Eager and compiled timings of two callables of the same inputs, the compile time and the output gap."""
    with torch.no_grad():
        t = time.perf_counter()
        ref = eager_fn()
        eager_first = time.perf_counter() - t
        t = time.perf_counter()
        compiled_fn()  # compiles
        first = time.perf_counter() - t
        eager_s, ref = timed(eager_fn, repeats)
        comp_s, out = timed(compiled_fn, repeats)
    return {
        "eager_s": eager_s,
        "compiled_s": comp_s,
        "speedup": eager_s / comp_s,
        "compile_s": first - eager_first,
        "max_abs_diff": float((out.float() - ref.float()).abs().max()),
        "ref_abs_max": float(ref.float().abs().max()),
    }


def refiner_rows(net: Refiner, latents: dict, text: torch.Tensor, repeats: int) -> dict:
    eager = copy.deepcopy(net)
    net.compile_repeated_blocks(dynamic=False)
    rows = {}
    for name, shape in latents.items():
        x, cond = torch.randn(1, *shape), torch.randn(1, *shape)
        t = torch.full((1,), 0.5)
        call = lambda m: lambda: m(x, t, cond, text, return_dict=False)[0]  # noqa: E731
        rows[name] = compare(call(eager), call(net), repeats)
        print(f"refiner {name}: {rows[name]}", file=sys.stderr)
    return rows


def base_rows(model, latents: dict, repeats: int) -> dict:
    transformer = model.pipe.transformer
    eager = copy.deepcopy(transformer)
    compiled = transformer
    compiled.compile_repeated_blocks(dynamic=False)
    cond = model.encode_prompt([PROMPT])
    rows = {}
    for name, shape in latents.items():
        x = torch.randn(1, *shape)

        def call(m):
            def fn():
                model.pipe.transformer = model.experts["transformer"] = m  # the adapter calls its experts
                return model.velocity(x, 0.5, cond)

            return fn

        rows[name] = compare(call(eager), call(compiled), repeats)
        print(f"base {name}: {rows[name]}", file=sys.stderr)
    model.pipe.transformer = model.experts["transformer"] = compiled
    return rows


def markdown(res: dict) -> str:
    lines = [
        "# Regional compilation on CPU (`compile_repeated_blocks`), compiled against eager",
        "",
        f"`{res['command']}` on {res['machine']}, {res['threads']} torch thread(s), torch {res['torch']}, "
        f"float32; median of {res['repeats']} calls after a warm-up; inductor cache {res['inductor_cache']}.",
        "",
        "| model | shape | tokens | eager s | compiled s | speedup | compile s | max abs diff | max abs output |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in ("refiner", "base"):
        for shape, r in res[model].items():
            lines.append(
                f"| {model} | {shape} | {res['tokens'][model][shape]} | {r['eager_s']:.4f} | {r['compiled_s']:.4f} | "
                f"{r['speedup']:.2f}x | {r['compile_s']:.1f} | {r['max_abs_diff']:.1e} | {r['ref_abs_max']:.2f} |"
            )
    lines += [
        "",
        f"Refiner step = one forward ({res['params']['refiner'] / 1e6:.2f}M parameters); base call = one guided "
        f"velocity, two transformer forwards ({res['params']['base'] / 1e6:.2f}M parameters). Compile s: the first "
        "compiled call minus an eager call (per shape: shapes are compiled statically).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as bench_generate)")
    ap.add_argument("--out", default="benchmarks/results/compile.json", help="JSON output (.md next to it)")
    ap.add_argument("--warm-cache", action="store_true", help="use inductor's on-disk cache (default: a fresh one)")
    a = ap.parse_args(argv)
    if not a.warm_cache:  # compile seconds as a first run on a new machine sees them: nothing compiled before
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compile_inductor_")
    os.chdir(ROOT)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    spec = BaseSpec.from_name("toy")
    model = load_base_model(spec, "cpu")
    geo = model.geometry
    latents = {k: geo.latent_shape(f, h, w) for k, (f, h, w) in SHAPES.items()}
    rcfg = RefinerConfig(
        in_channels=spec.channels,
        dim=32,
        depth=4,
        heads=2,
        mlp_ratio=3.0,
        window=(2, 8, 8),
        text_dim=model.pipe.transformer.config.text_dim,
    )
    net = Refiner.from_cfg(rcfg).eval()
    with torch.no_grad():  # trained-looking weights: the zero-initialised output projection and gates output 0
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    text = torch.randn(1, 8, rcfg.text_dim)
    patch = model.pipe.transformer.config.patch_size
    tokens = {
        m: {k: (s[1] // p[0]) * (s[2] // p[1]) * (s[3] // p[2]) for k, s in latents.items()}
        for m, p in (("refiner", rcfg.patch_size), ("base", patch))
    }
    res = {
        "command": "python benchmarks/bench_compile.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "threads": a.threads,
        "torch": torch.__version__,
        "repeats": a.repeats,
        "inductor_cache": "warm (on disk)" if a.warm_cache else "fresh (cold compile)",
        "latents": {k: list(v) for k, v in latents.items()},
        "tokens": tokens,
        "params": {"refiner": num_params(net), "base": num_params(model.pipe.transformer)},
        "refiner": refiner_rows(net, latents, text, a.repeats),
        "base": base_rows(model, latents, a.repeats),
    }
    res["machine"] += f" (end load {os.getloadavg()[0]:.1f})"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
