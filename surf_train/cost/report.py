"""Markdown tables of the cost model: the per-stage table of each run and SURF composed with the plug-ins."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from surf_train.cost.measured import MEASURED, TOY_BLOCKS


def format_table(runs: list[dict[str, Any]]) -> str:
    """One section per run_costs result: its settings line, the stage table, the totals and the speedup."""
    lines = []
    for r in runs:
        st = r["settings"]
        lines.append(f"## {r['label']}")
        lines.append(
            f"CFG x{st['cfg_factor']}, text {st['text_len']} tokens, refiner {st['refiner']} "
            f"window {st['refiner_config']['window']} ({st['attn_impl']}), rule {st['rule']}"
        )
        lines.append("")
        lines.append("| run | stage | size | latent (C,F,H,W) | tokens | calls | TFLOPs/call | PFLOPs |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for x in r["stages"]:
            lines.append(
                f"| {x['run']} | {x['stage']} | {x['size']} | {tuple(x['latent'])} | {x['tokens']} | "
                f"{x['calls']} | {x['tflops_per_call']:.2f} | {x['pflops']:.2f} |"
            )
        lines.append(f"| **baseline** | | | | | | | **{r['baseline_pflops']:.2f}** |")
        lines.append(f"| **SURF** | | | | | | | **{r['surf_pflops']:.2f}** |")
        lines.append("")
        lines.append(f"FLOPs speedup: {r['speedup']:.2f}x")
        lines.append("")
    return "\n".join(lines)


def format_composed(rows: list[dict[str, Any]], measured: Mapping[str, Any]) -> str:
    """The composed_speedups rows under a note saying where the hit rates come from and what transfers."""
    if measured:
        src = (
            f"Cache hit rates measured on the toy base (N={measured['n']}, {MEASURED}; its CFG stop step "
            f"{measured['cfg_stop']} and fewer steps {measured['fewer_steps']} of {measured['steps']} scaled to "
            "SURF's 40)."
        )
    else:
        src = f"No toy measurement ({MEASURED} absent): cache hit rates 0."
    lines = [
        "## Wan 2.1 14B, 81 frames: SURF composed with acceleration plug-ins (FLOPs)",
        "",
        src,
        "What transfers: CFG truncation and fewer steps are counted exactly (calls skipped do not depend on the "
        f"model). What does not: the cache hit rates belong to the toy's {TOY_BLOCKS}-block network, its threshold and "
        "its noise levels; a real model's hits, and whether quality survives them, must be measured there (on the "
        "toy every plug-in costs caption match: benchmarks/results/accel/accel.md). "
        "A hit is counted as running only the first block. 1080p is 1920x1072 (WanPipeline floors the "
        "height to a multiple of 16).",
        "",
        "| target | method | cache hits | PFLOPs | vs baseline (50 steps) | vs SURF |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['method']} | {r['cache_hits']:.2f} | {r['pflops']:.2f} | "
            f"{r['speedup']:.1f}x | {r['vs_surf']:.2f}x |"
        )
    return "\n".join(lines) + "\n"
