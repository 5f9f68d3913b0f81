"""Pair generation on the tiny base model: pairs/s, and the shared prefix's saving versus separate runs.

    .venv/bin/python benchmarks/bench_pairs.py [--repeats 7] [--out benchmarks/results/pairs.json]

Shared: prefix once, then target and preview branches. Separate: a full target run plus a full preview
run (prefix included). Predicted ratio: network calls at each resolution (count_calls) times the
per-call time measured at that resolution in the same run.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from surf_train.base import BaseSpec, load_base_model
from surf_train.base.sampling import PreviewPlan, count_calls, pair_sample, preview_sample, sample
from surf_train.data.pairs import PairsConfig, make_pairs


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--switch", type=int, default=5)
    ap.add_argument("--rule", default="paper")
    ap.add_argument("--out", default="benchmarks/results/pairs.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    spec = BaseSpec.from_name("tiny")
    model = load_base_model(spec, "cpu")
    c, f, h, w = model.geometry.latent_shape(spec.native_frames, *spec.native_size)
    plan = PreviewPlan(model.schedule(a.steps), switch=a.switch, preview_size=(h // 2, w // 2), rule=a.rule)
    cond = model.encode_prompt(["a red ball rolling across a wooden floor"])
    vel = model.velocity_fn(cond)
    noise, fresh = torch.randn(1, c, f, h, w), torch.randn(1, c, f, h // 2, w // 2)

    pair_sample(vel, noise, plan, fresh)  # warm-up
    rounds = []  # interleaved so that load from other processes hits every measurement alike
    for _ in range(a.repeats):
        rounds.append(
            (
                timed(lambda: vel(noise, 0.5), 5),
                timed(lambda: vel(fresh, 0.5), 5),
                timed(lambda: pair_sample(vel, noise, plan, fresh), 1),
                timed(lambda: (sample(vel, noise, plan.schedule), preview_sample(vel, noise, plan, fresh)), 1),
            )
        )
    call_high, call_low, shared, separate = (statistics.median(col) for col in zip(*rounds))
    n = count_calls(plan)
    pred_shared = n["shared_high"] * call_high + n["shared_low"] * call_low
    pred_separate = n["separate_high"] * call_high + n["separate_low"] * call_low

    with tempfile.TemporaryDirectory() as d:
        cfg = PairsConfig(
            base=spec, out_dir=d, num_pairs=16, steps=a.steps, switch=a.switch, rule=a.rule, progress=False
        )
        summary = make_pairs(cfg)

    res = {
        "target_latent": [c, f, h, w],
        "preview_latent": [c, f, h // 2, w // 2],
        "steps": a.steps,
        "switch": a.switch,
        "rule": a.rule,
        "calls": n,
        "call_ms_high": 1e3 * call_high,
        "call_ms_low": 1e3 * call_low,
        "shared_s": shared,
        "separate_s": separate,
        "measured_ratio": shared / separate,
        "predicted_ratio": pred_shared / pred_separate,
        "measured_saving": 1 - shared / separate,
        "predicted_saving": 1 - pred_shared / pred_separate,
        "pairs_per_s": summary["pairs_per_s"],
        "torch_threads": torch.get_num_threads(),
    }
    res["saving_error"] = abs(res["measured_saving"] - res["predicted_saving"]) / res["predicted_saving"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"tiny Wan, target latent {res['target_latent']}, {a.steps} steps, switch {a.switch}, rule {a.rule}")
    print(f"per call: {res['call_ms_high']:.1f} ms at target size, {res['call_ms_low']:.1f} ms at preview size")
    print(f"pair, shared prefix: {shared:.3f}s  separate runs: {separate:.3f}s  (median of {a.repeats})")
    print(
        f"saving measured {res['measured_saving']:.1%}, predicted from call counts {res['predicted_saving']:.1%} "
        f"(relative difference {res['saving_error']:.1%})"
    )
    print(f"make_pairs: {res['pairs_per_s']:.2f} pairs/s (16 pairs)")


if __name__ == "__main__":
    main()
