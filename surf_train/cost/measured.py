"""SURF composed with the acceleration plug-ins: the cache hit rates and step settings the toy measured
(`python -m surf_train.evaluate_accel` writes them to accel.json), carried over to a published model's run plans."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from surf_train.base.tiny import TOY_WAN_TRANSFORMER
from surf_train.common.errors import ConfigError
from surf_train.cost.plans import RunSettings, fmt_size, run_costs

MEASURED = "benchmarks/results/accel/accel.json"  # in a checkout: the shipped toy measurement
TOY_BLOCKS = TOY_WAN_TRANSFORMER["num_layers"]  # transformer blocks of the toy base


def measured_accel(path: str | Path) -> dict[str, Any]:
    """What a toy accel.json measured: FirstBlockCache hit rates per method, and its step settings.

    The toy evaluation reports blocks run / blocks of full forwards, f; a hit runs 1 of the toy's 4 blocks,
    a miss all 4, so hits = (1 - f) / (1 - 1/4).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"toy acceleration results {p} not found (python -m surf_train.evaluate_accel writes them)")
    res = json.loads(p.read_text())
    hits = {k: round((1 - r["blocks_run"]) / (1 - 1 / TOY_BLOCKS), 4) for k, r in res["methods"].items()}
    c = res["config"]
    few = [r["settings"]["switch"] for k, r in res["methods"].items() if k.startswith("surf@")]
    return {
        "hits": hits,
        "steps": c["steps"],
        "switch": c["switch"],
        "cfg_stop": c.get("cfg_stop"),
        "fewer_steps": c["fewer_steps"],
        "n": res["n"],
        **({"few_switch": few[-1]} if few else {}),
    }


def composed_speedups(
    measured: Mapping[str, Any], targets=((1280, 720), (1920, 1072)), model: str = "wan2.1_t2v_14b"
) -> list[dict[str, Any]]:
    """Baseline and SURF (10 + 30 steps, 10 Refiner steps) with and without the plug-ins, per target size.

    Each row: PFLOPs, the speedup against the plain 50-step baseline at that size and against plain SURF.
    """
    out = []
    for target in targets:
        base = RunSettings(model=model, target=target, steps=50, surf_steps=40, switch=10)
        variants = plugin_variants(measured, base)
        costs = {name: run_costs(st)[f"{run}_pflops"] for name, run, st in variants}
        for name, _, st in variants:
            out.append(
                {
                    "target": fmt_size(target),
                    "method": name,
                    "cache_hits": st.cache_hits,
                    "pflops": costs[name],
                    "speedup": costs["baseline"] / costs[name],
                    "vs_surf": costs["surf"] / costs[name],
                }
            )
    return out


def plugin_variants(measured: Mapping[str, Any], base: RunSettings) -> list[tuple[str, str, RunSettings]]:
    """(method, run it is read from, settings) of each plug-in combination on `base` (SURF's 40 steps).

    The toy's settings are carried over as fractions of the schedule: its cache hit rates per method (0 where
    not measured), its CFG stop step and its fewer steps (both scaled from the toy's steps to SURF's 40).
    """
    hits = measured.get("hits", {})
    toy_steps = measured.get("steps", 20)
    scale = lambda k: round(k * 40 / toy_steps)
    stop = scale(measured.get("cfg_stop") or 8)
    few = scale(measured.get("fewer_steps", 10))
    few_switch = max(
        1,
        int(10 * few / 40 + 0.5)
        if "few_switch" not in measured
        else int(measured["few_switch"] * few / measured["fewer_steps"] + 0.5),
    )  # the toy's share
    h = lambda k: hits.get(k, 0.0)
    return [
        ("baseline", "baseline", base),
        ("baseline+cache", "baseline", replace(base, cache_hits=h("baseline+cache"))),
        ("surf", "surf", base),
        ("surf+cache", "surf", replace(base, cache_hits=h("surf+cache"))),
        ("surf+cfg-low", "surf", replace(base, cfg_low=False)),
        ("surf+cache+cfg-low", "surf", replace(base, cfg_low=False, cache_hits=h("surf+cache+cfg-low"))),
        (f"surf+cfg-stop ({stop})", "surf", replace(base, cfg_stop=stop)),
        (f"surf+cache+cfg-stop ({stop})", "surf", replace(base, cfg_stop=stop, cache_hits=h("surf+cache+cfg-stop"))),
        (
            f"surf@{few} ({few_switch} + {few - few_switch} steps)",
            "surf",
            replace(base, surf_steps=few, switch=few_switch),
        ),
    ]
