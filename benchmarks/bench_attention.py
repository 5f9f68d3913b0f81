"""Refiner training-step time, windowed versus full self-attention, as the token count grows (DESIGN 3.4).

    .venv/bin/python benchmarks/bench_attention.py [--repeats 7] [--out benchmarks/results/attention.json]

One training step = forward + MSE loss + backward + AdamW step of a small Refiner (text_dim 0, batch 1)
on a random (1, 16, F, H, W) latent. Variants: "full" (window (0, 0, 0): one window holding the whole
grid, no shift, no mask, see windows.clamp_window), and windowed attention with the same `--window`
through both implementations, "mask" (roll-and-mask reference) and "grouped" (mask-free, one SDPA call
per window size). Every variant starts from the same weights. Token grids double in size; full
attention is skipped above --full-max-tokens (it grows quadratically; at 16384 tokens one step already
takes ~8 s on a 2-core CPU).

Each repeat runs every (size, variant) once, variants round-robin in an order rotated each repeat, so
load from other processes hits all of them alike; the figure is the median over repeats. A sample is
`inner` back-to-back steps (chosen from the warm-up so a sample lasts >= --min-sample-s) divided by
`inner`. The growth exponent is the least-squares slope of log(ms/step) against log(tokens), over all
sizes and over the three largest sizes a variant was measured at (also from the per-size minimum,
the least-disturbed sample, as a check on load from other processes). Writes JSON (--out) and a
markdown table (--md).

Default sizes stop at 16384 tokens. On the 2-core reference machine (32 MiB L3, shared with other
jobs) a 32768-token step (`--grids ...,16x32x64`) leaves the cache: memory-bound element-wise ops
that have nothing to do with attention (gelu, copy_, add, fill_) then cost 2.5-5x for 2x tokens in a
profile, which would be measured as "attention scaling" although full attention pays it too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from surf_train.models.refiner import Refiner, RefinerConfig

PATCH = (1, 2, 2)
C = 16
DEFAULT_GRIDS = "2x16x16,4x16x16,8x16x16,16x16x16,16x16x32,16x32x32"  # 512 .. 16384 tokens


def parse_triple(s: str) -> tuple[int, int, int]:
    t = tuple(int(v) for v in s.lower().split("x"))
    if len(t) != 3:
        raise argparse.ArgumentTypeError(f"expected AxBxC, got {s!r}")
    return t  # type: ignore[return-value]


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(ys) against log(xs)."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def build(cfg_kw: dict, window, impl: str, state: dict | None, lr: float):
    model = Refiner.from_cfg(RefinerConfig(window=window, attn_impl=impl, **cfg_kw)).train()
    if state is not None:
        model.load_state_dict(state)
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def make_step(model, opt, x, t, cond, target):
    def step():
        out = model(x, t, cond, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--grids",
        default=DEFAULT_GRIDS,
        help="comma-separated token grids F'xH'xW' (latent = grid * patch (1, 2, 2)); default %(default)s",
    )
    ap.add_argument("--window", type=parse_triple, default=(2, 8, 8), help="window in tokens, default 2x8x8")
    ap.add_argument("--impls", default="mask,grouped", help="windowed implementations to time, default %(default)s")
    ap.add_argument(
        "--full-max-tokens",
        type=int,
        default=8192,
        help="time full attention only up to this many tokens (default %(default)s)",
    )
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=11, help="measured rounds (median taken), default %(default)s")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per (size, variant), default %(default)s")
    ap.add_argument(
        "--min-sample-s",
        type=float,
        default=0.1,
        help="back-to-back steps per sample so that one sample lasts at least this long",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch default); default 1: on a shared 2-core machine two threads "
        "stall on each other whenever another process runs, which swamps the signal",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    ap.add_argument("--md", default="benchmarks/results/attention.md")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t_start = time.perf_counter()

    grids = [parse_triple(s) for s in a.grids.split(",")]
    cfg_kw = dict(in_channels=C, patch_size=PATCH, dim=a.dim, depth=a.depth, heads=a.heads, text_dim=0)
    ref = Refiner.from_cfg(RefinerConfig(**cfg_kw))
    with torch.no_grad():  # undo the zero init of adaLN gates and output so attention shapes the loss
        for p in ref.parameters():
            zero = p == 0
            p[zero] = 0.02 * torch.randn(int(zero.sum()))
    state = ref.state_dict()
    variants = {"full": build(cfg_kw, (0, 0, 0), "mask", state, 1e-4)}
    impls = [s for s in a.impls.split(",") if s]
    for impl in impls:
        variants[impl] = build(cfg_kw, a.window, impl, state, 1e-4)
    names = list(variants)

    # Same weights, same input: the two windowed implementations must agree (sanity, smallest grid).
    g0 = grids[0]
    x0 = torch.randn(1, C, *(g * p for g, p in zip(g0, PATCH)))
    with torch.no_grad():
        outs = {n: variants[n][0](x0, torch.full((1,), 0.5), x0.flip(-1)) for n in impls}
        outs["full"] = variants["full"][0](x0, torch.full((1,), 0.5), x0.flip(-1))
    impl_diff = max((outs[n] - outs[impls[0]]).abs().max().item() for n in impls) if impls else None
    # Non-zero: attention is live in the loss (not hidden behind zero-initialised gates).
    full_diff = (outs["full"] - outs[impls[0]]).abs().max().item() if impls else None

    sizes = []
    for grid in grids:
        n_tok = math.prod(grid)
        latent = tuple(g * p for g, p in zip(grid, PATCH))
        x, cond, target = (torch.randn(1, C, *latent) for _ in range(3))
        t = torch.rand(1)
        steps, inner = {}, {}
        for name in names:
            if name == "full" and n_tok > a.full_max_tokens:
                continue
            steps[name] = make_step(*variants[name], x, t, cond, target)
            tw = []
            for _ in range(a.warmup):
                s = time.perf_counter()
                steps[name]()
                tw.append(time.perf_counter() - s)
            inner[name] = max(1, math.ceil(a.min_sample_s / min(tw)))
        sizes.append(
            dict(grid=grid, latent=latent, tokens=n_tok, steps=steps, inner=inner, samples={n: [] for n in steps})
        )

    for r in range(a.repeats):
        for sz in sizes:
            order = [n for n in names if n in sz["steps"]]
            k = r % len(order)
            for name in order[k:] + order[:k]:  # round-robin, rotated each repeat
                fn, m = sz["steps"][name], sz["inner"][name]
                s = time.perf_counter()
                for _ in range(m):
                    fn()
                sz["samples"][name].append((time.perf_counter() - s) / m * 1e3)

    rows = []
    for sz in sizes:
        ms = {n: statistics.median(v) for n, v in sz["samples"].items()}
        row = dict(
            grid=list(sz["grid"]),
            latent=[C, *sz["latent"]],
            tokens=sz["tokens"],
            ms_per_step=ms,
            min_ms_per_step={n: min(v) for n, v in sz["samples"].items()},
            samples_ms=sz["samples"],
            inner_steps=sz["inner"],
            us_per_token={n: 1e3 * v / sz["tokens"] for n, v in ms.items()},
            full_over_windowed={n: ms["full"] / ms[n] for n in impls if "full" in ms},
        )
        rows.append(row)

    exps = {}
    for name in names:
        pts = [(r["tokens"], r["ms_per_step"][name]) for r in rows if name in r["ms_per_step"]]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        mins = [r["min_ms_per_step"][name] for r in rows if name in r["ms_per_step"]]
        exps[name] = {
            "all": slope(xs, ys),
            "top3": slope(xs[-3:], ys[-3:]),
            "top3_tokens": xs[-3:],
            "all_from_min": slope(xs, mins),
            "top3_from_min": slope(xs[-3:], mins[-3:]),
        }
        full_top = [r["tokens"] for r in rows if "full" in r["ms_per_step"]][-3:]
        if name != "full" and full_top:  # same three sizes as full attention's top 3, for comparison
            sel = [(x, y) for x, y in pts if x in full_top]
            exps[name]["top3_of_full_sizes"] = slope([p[0] for p in sel], [p[1] for p in sel])
    target = 1.15
    met = {n: exps[n]["top3"] is not None and exps[n]["top3"] <= target for n in impls}

    res = {
        "benchmark": "Refiner training step (forward + MSE + backward + AdamW), batch 1, CPU",
        "command": " ".join([shlex.quote(sys.executable)] + [shlex.quote(s) for s in sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "config": {
            **cfg_kw,
            "window": list(a.window),
            "patch_size": list(PATCH),
            "full_window": [0, 0, 0],
            "mlp_ratio": RefinerConfig().mlp_ratio,
            "params": sum(p.numel() for p in ref.parameters()),
        },
        "repeats": a.repeats,
        "warmup": a.warmup,
        "min_sample_s": a.min_sample_s,
        "full_max_tokens": a.full_max_tokens,
        "impl_max_abs_diff": impl_diff,
        "full_vs_windowed_max_abs_diff": full_diff,
        "rows": rows,
        "exponents": exps,
        "target_windowed_top3_exponent": target,
        "target_met": met,
        "wall_s": time.perf_counter() - t_start,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    head = (
        ["tokens", "grid F'xH'xW'"]
        + [f"{n} ms" for n in names]
        + [f"full/{n}" for n in impls]
        + [f"{n} us/token" for n in impls]
    )
    lines = [
        f"# Refiner training step: windowed vs full attention ({res['torch']} CPU, {res['torch_threads']} threads)",
        "",
        f"dim {a.dim}, depth {a.depth}, heads {a.heads}, text_dim 0, patch (1, 2, 2), window "
        f"{tuple(a.window)} tokens, batch 1; forward + MSE + backward + AdamW; median of {a.repeats} "
        f"interleaved repeats after {a.warmup} warm-up steps. Full attention = window (0, 0, 0), "
        f"timed up to {a.full_max_tokens} tokens.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        ms = r["ms_per_step"]
        cells = (
            [str(r["tokens"]), "x".join(map(str, r["grid"]))]
            + [f(ms.get(n)) for n in names]
            + [f(r["full_over_windowed"].get(n), "{:.2f}") for n in impls]
            + [f(r["us_per_token"].get(n), "{:.1f}") for n in impls]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Growth exponent (slope of log time vs log tokens):",
        "",
        "| variant | all sizes | top 3 sizes | top 3, from per-size minimum | top 3 sizes of full |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        e = exps[n]
        lines.append(
            f"| {n} | {f(e['all'], '{:.2f}')} | {f(e['top3'], '{:.2f}')} "
            f"({'/'.join(map(str, e['top3_tokens']))}) | {f(e['top3_from_min'], '{:.2f}')} "
            f"| {f(e.get('top3_of_full_sizes'), '{:.2f}')} |"
        )
    lines += [
        "",
        f"Target: windowed exponent over the top 3 sizes <= {target}: "
        + ", ".join(f"{n} {'met' if met[n] else 'NOT met'}" for n in impls)
        + ".",
        f"Same weights, smallest grid: max |output difference| mask vs grouped {f(impl_diff, '{:.1e}')}, "
        f"full vs windowed {f(full_diff, '{:.1e}')}.",
        "",
        f"Command: `{res['command']}` (wall {res['wall_s']:.0f} s)",
        "",
    ]
    Path(a.md).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
