"""Training-data throughput of PairDataModule on tiny pairs, against what one training step consumes.

    .venv/bin/python benchmarks/bench_data.py [--pairs 32] [--samples 512] [--repeats 3] [--out PATH]

Loaded: samples/s of full training epochs (worker start-up included) for num_workers 0 and 2, median of
`repeats` epochs. Consumed: batch_size / (median time of one optimizer step of the tiny Refiner, or a Conv3d
stand-in when surf_train.models.refiner is missing or fails) on a batch from the same loader. Ratio > 1: the loader
keeps up. Loader and step are timed separately; in training they share the CPU cores.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from surf_train.data.datamodule import DataConfig, PairDataModule
from surf_train.data.pairs import PairsConfig, make_pairs


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def step_fn(batch):
    """(one optimizer step on `batch`, model description)."""
    text = batch.get("text")
    try:
        from surf_train.models.refiner import Refiner, RefinerConfig, num_params
        from surf_train.training.objective import BridgeConfig, bridge_loss

        net = Refiner.from_cfg(
            RefinerConfig.preset(
                "tiny", in_channels=batch["target"].shape[1], text_dim=text.shape[-1] if text is not None else 0
            )
        )
        bridge = BridgeConfig()

        def loss():
            return bridge_loss(net, batch["preview"], batch["target"], bridge, text)

        loss()  # fails here rather than inside the timing when the shapes do not fit
        name = f"Refiner tiny preset ({num_params(net) / 1e6:.2f}M parameters), bridge_loss"
    except Exception as e:  # the refiner is written by someone else; measure something rather than nothing
        print(f"Refiner unavailable ({type(e).__name__}: {e}); using a Conv3d stand-in")
        c = batch["target"].shape[1]
        net = torch.nn.Sequential(
            torch.nn.Conv3d(2 * c, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(64, c, 3, padding=1)
        )
        up = torch.nn.functional.interpolate(batch["preview"], size=batch["target"].shape[2:], mode="nearest")

        def loss():
            return torch.nn.functional.mse_loss(net(torch.cat([batch["target"], up], 1)), batch["target"])

        name = "Conv3d stand-in (2C->64->C, 3x3x3)"
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return step, name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--samples", type=int, default=512, help="training samples per measured epoch")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/data.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    res = {
        "pairs": a.pairs,
        "batch_size": a.batch_size,
        "samples_per_epoch": a.samples,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loaded_samples_per_s": {},
    }
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        make_pairs(
            PairsConfig.from_dict(
                {
                    "base": "tiny",
                    "out_dir": d,
                    "height": 128,
                    "width": 128,
                    "frames": 17,
                    "steps": 4,
                    "switch": 1,
                    "num_pairs": a.pairs,
                    "shard_size": 8,
                    "progress": False,
                }
            )
        )
        res["make_pairs_s"] = time.perf_counter() - t
        res["shard_bytes"] = sum(p.stat().st_size for p in Path(d).glob("*.tar"))
        for workers in (0, 2):
            dm = PairDataModule(
                DataConfig(
                    shards=d, batch_size=a.batch_size, num_workers=workers, samples_per_epoch=a.samples, val_samples=0
                )
            )
            loader = dm.train_dataloader()
            n = len(loader) * a.batch_size
            res["loaded_samples_per_s"][str(workers)] = n / timed(lambda: sum(1 for _ in loader), a.repeats)
        batch = next(iter(dm.train_dataloader()))
        res["preview"], res["target"] = list(batch["preview"].shape), list(batch["target"].shape)
        res["text"] = list(batch["text"].shape) if "text" in batch else None
    step, res["model"] = step_fn(batch)
    step()  # warm-up
    res["step_s"] = timed(step, max(5, 3 * a.repeats))
    res["consumed_samples_per_s"] = a.batch_size / res["step_s"]
    res["ratio_loaded_over_consumed"] = {
        k: v / res["consumed_samples_per_s"] for k, v in res["loaded_samples_per_s"].items()
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(
        f"{a.pairs} tiny pairs ({res['shard_bytes'] / 1e6:.1f} MB): batch preview {res['preview']}, "
        f"target {res['target']}, text {res['text']}"
    )
    for k, v in res["loaded_samples_per_s"].items():
        print(
            f"loaded, num_workers={k}: {v:8.1f} samples/s  "
            f"(x{res['ratio_loaded_over_consumed'][k]:.1f} what one step consumes)"
        )
    print(
        f"consumed: {res['consumed_samples_per_s']:8.1f} samples/s  ({1e3 * res['step_s']:.1f} ms per step of "
        f"batch {a.batch_size}; {res['model']})"
    )


if __name__ == "__main__":
    main()
