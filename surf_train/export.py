"""Training checkpoint -> standalone Refiner directory (safetensors + JSON), and loading it back.

    python -m surf_train.export runs/tiny/checkpoints/last.ckpt exported/tiny [--weights ema|raw] [--dtype ...]

Reads Lightning `.ckpt` files and DeepSpeed ZeRO-2 checkpoint directories with `weights_only=True`
(nothing is unpickled). The output rebuilds the model with `load_refiner` alone: no Hydra, Lightning,
DeepSpeed or W&B.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from surf_train.errors import ConfigError
from surf_train.refiner import Refiner, RefinerConfig, refiner_config

FORMAT, VERSION = "surf-refiner", 1
WEIGHTS, CONFIG = "refiner.safetensors", "config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(state dict of the LightningModule, its hyper-parameters, global step) from a .ckpt or ZeRO dir."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    f = path / "checkpoint" / "mp_rank_00_model_states.pt" if path.is_dir() else path
    if not f.is_file():
        raise ConfigError(f"{path}: neither a Lightning checkpoint file nor a DeepSpeed checkpoint directory")
    try:
        ck = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{f}: cannot be read as a checkpoint without unpickling objects ({type(e).__name__})") \
            from None
    if not isinstance(ck, dict):
        raise ConfigError(f"{f}: not a training checkpoint")
    state = ck.get("state_dict", ck.get("module"))
    hp = ck.get("hyper_parameters")
    ema = ck.get("ema")  # the float32 EMA kept outside the module (surf_train.module.EMA)
    if isinstance(state, dict) and isinstance(ema, dict) and isinstance(ema.get("state_dict"), dict):
        state = {**state, **{f"ema.module.{k}": v for k, v in ema["state_dict"].items()}}
    if not isinstance(state, dict) or not isinstance(hp, dict) or "model" not in hp or \
            not any(k.startswith("net.") for k in state):
        raise ConfigError(f"{path}: not a surf_train Refiner checkpoint (no net.* weights or model settings)")
    if path.is_dir() and any(v.numel() == 0 for k, v in state.items() if k.startswith("net.")):
        raise ConfigError(f"{path}: ZeRO-3 checkpoint (parameters are partitioned); convert it first with "
                          f"lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict "
                          f"and export the resulting file")
    return state, hp, int(ck.get("global_step", -1))


def export(ckpt: str | os.PathLike, out_dir: str | os.PathLike, weights: str = "auto",
           dtype: str = "float32") -> Path:
    """Write refiner.safetensors + config.json to out_dir (atomically); returns out_dir."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose from {list(DTYPES)}")
    state, hp, step = read_checkpoint(ckpt)
    has_ema = any(k.startswith("ema.module.") for k in state)
    if weights == "auto":
        weights = "ema" if has_ema else "raw"
    if weights not in ("ema", "raw"):
        raise ConfigError(f"--weights {weights!r}: choose ema, raw or auto")
    if weights == "ema" and not has_ema:
        raise ConfigError(f"{ckpt}: no EMA weights in this checkpoint (trained with module.ema_decay=null); "
                          f"use --weights raw")
    prefix = "ema.module." if weights == "ema" else "net."
    tensors = {k[len(prefix):]: v.to(DTYPES[dtype]).contiguous() for k, v in state.items() if k.startswith(prefix)}
    cfg = refiner_config(hp["model"])
    check_weights(_shapes(cfg), tensors, str(ckpt))
    return save_refiner(tensors, cfg, out_dir, bridge=hp.get("bridge") or {}, weights=weights, dtype=dtype,
                        step=step, source=str(Path(ckpt).resolve()), trained_on=hp.get("trained_on"))


def _is_export(d: Path) -> bool:
    """A directory this module wrote: config.json of our format and nothing but our own files."""
    try:
        meta = json.loads((d / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == FORMAT and {p.name for p in d.iterdir()} <= {CONFIG, WEIGHTS}


def _check_out_dir(out: Path) -> None:
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"output {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_export(out):
        raise ConfigError(f"output {out} is a non-empty directory that is not an exported Refiner; "
                          f"refusing to replace it (choose a new directory)")


def save_refiner(tensors: dict[str, torch.Tensor], cfg: RefinerConfig, out_dir: str | os.PathLike,
                 **meta) -> Path:
    """Write an exported Refiner directory atomically: beside it under a temporary name, then swapped in.

    Only an empty directory or an earlier export is ever replaced, never anything the user put there."""
    meta = {"format": FORMAT, "version": VERSION, "refiner": cfg.to_dict(), "bridge": {}, "dtype": "float32",
            **meta}
    out = Path(out_dir)
    _check_out_dir(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own pid's leftover only
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1))
        if out.is_dir() and any(out.iterdir()):
            os.replace(out, old)  # the previous export, checked by _check_out_dir
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def check_weights(want: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ConfigError naming the keys and shapes where weights and the config's shapes (`want`) disagree."""
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or bad:
        detail = "; ".join(filter(None, [
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}" if missing else "",
            f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}" if extra else "",
            ", ".join(f"{k}: weights {got[k]} vs config {want[k]}" for k in bad[:4])]))
        raise ConfigError(f"{where}: weights do not match the Refiner config ({detail})")


def _shapes(cfg: RefinerConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Refiner.from_cfg(cfg).state_dict().items()}


def load_refiner(directory: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[Refiner, dict]:
    """Rebuild an exported Refiner (eval mode) and return it with its config.json contents."""
    d = Path(directory)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise ConfigError(f"{d}: not an exported Refiner (needs {CONFIG} and {WEIGHTS}); "
                          f"make one with python -m surf_train.export")
    meta = json.loads((d / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{d / CONFIG}: format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = RefinerConfig.from_dict(meta["refiner"])
    tensors = load_file(str(d / WEIGHTS))
    with torch.device("meta"):
        net = Refiner.from_cfg(cfg)
    check_weights({k: tuple(v.shape) for k, v in net.state_dict().items()}, tensors, str(d / WEIGHTS))
    net.load_state_dict(tensors, assign=True)
    net = net.to(device=device, dtype=dtype or DTYPES[meta.get("dtype", "float32")]).eval().requires_grad_(False)
    return net, meta


def check_base(meta: dict, spec, where: str, force: bool = False) -> str | None:
    """Refuse a Refiner trained on another base model than `spec` (a BaseSpec); returns a warning or None.

    Two families can share a channel count (Wan and HunyuanVideo: 16), so the record decides, not shapes."""
    channels = meta.get("refiner", {}).get("in_channels")
    if channels != spec.channels:
        raise ConfigError(f"{where} works on {channels}-channel latents but base model {spec.name} has "
                          f"{spec.channels}")
    rec = (meta.get("trained_on") or {}).get("base")
    if not rec:
        return f"{where} records no base model (exported before the record existed): not checked"
    want = {"id": spec.model_id, "revision": spec.revision, "family": spec.family}
    got = {k: rec.get(k) for k in want}
    if got != want and not force:
        diff = ", ".join(f"{k} {got[k]!r} (base {want[k]!r})" for k in want if got[k] != want[k])
        raise ConfigError(f"{where} was trained on base model {rec.get('name')!r}, not {spec.name!r}: {diff}; "
                          f"pass --force to use it anyway")
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m surf_train.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="Lightning .ckpt file or DeepSpeed checkpoint directory "
                                       "(e.g. runs/tiny/checkpoints/last.ckpt)")
    ap.add_argument("out_dir", help="output directory: new, empty, or an earlier export (which is replaced)")
    ap.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                    help="EMA or raw weights (auto: EMA when the checkpoint has it)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="storage dtype of the weights")
    a = ap.parse_args(argv)
    try:
        out = export(a.checkpoint, a.out_dir, a.weights, a.dtype)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    meta = json.loads((out / CONFIG).read_text())
    print(f"exported {meta['weights']} weights of step {meta['step']} ({meta['dtype']}) -> {out}")


if __name__ == "__main__":
    main()
