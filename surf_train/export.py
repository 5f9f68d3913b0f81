"""Training checkpoint -> a diffusers model directory of the Refiner, and loading it back.

    python -m surf_train.export runs/tiny/checkpoints/last.ckpt exported/tiny [--weights ema|raw] [--dtype ...]
    python -m surf_train.export --convert OLD_EXPORT NEW_DIR   # an export of the first format -> this one

The directory is Refiner.save_pretrained's (config.json + diffusion_pytorch_model.safetensors: load it with
`Refiner.from_pretrained(path, subfolder=..., torch_dtype=...)`), plus surf.json (what sampling needs beside
the weights: bridge settings, the base model it was trained on, step, which weights) and a model card
README.md. Checkpoints are read with `weights_only=True` (nothing is unpickled); loading needs no Hydra,
Lightning, DeepSpeed or W&B. Exports of the first format (refiner.safetensors + config.json) still load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from surf_train.checkpoint import check_weights, read_checkpoint, refiner_weights, shapes
from surf_train.dtypes import DTYPES
from surf_train.errors import ConfigError
from surf_train.refiner import Refiner, RefinerConfig, num_params, refiner_config

__all__ = ["export", "save_refiner", "load_refiner", "convert", "check_base", "is_export", "read_checkpoint"]

FORMAT, VERSION = "surf-refiner", 2
CONFIG, META, CARD = "config.json", "surf.json", "README.md"
WEIGHTS_PREFIX = "diffusion_pytorch_model"  # save_pretrained's file (or shards + index)
V1_WEIGHTS = "refiner.safetensors"  # version 1: refiner.safetensors + config.json holding all metadata


def export(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    weights: str = "auto",
    dtype: str = "float32",
    steps: int | None = None,
    start_noise: float | None = None,
    consistency: bool | None = None,
) -> Path:
    """Write the Refiner of a training checkpoint to out_dir (atomically); returns out_dir. `steps`, `start_noise`
    and `consistency` replace the sampler settings that generation and evaluation default to (bridge steps,
    sigma_aug_eval and consistency; the training run's validation settings otherwise)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose from {list(DTYPES)}")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps {steps}: the Refiner needs at least 1 step")
    if start_noise is not None and start_noise < 0:
        raise ConfigError(f"--start-noise {start_noise} must be >= 0")
    sampler = {"steps": steps, "sigma_aug_eval": start_noise, "consistency": consistency}
    state, hp, step = read_checkpoint(ckpt)
    tensors, weights = refiner_weights(state, weights, str(ckpt))
    cfg = refiner_config(hp["model"])
    check_weights(_shapes(cfg), shapes(tensors), str(ckpt))
    return save_refiner(
        tensors,
        cfg,
        out_dir,
        bridge={**(hp.get("bridge") or {}), **{k: v for k, v in sampler.items() if v is not None}},
        weights=weights,
        dtype=dtype,
        step=step,
        source=str(Path(ckpt).resolve()),
        trained_on=hp.get("trained_on"),
        run=_run_summary(Path(ckpt)),
    )


def _run_summary(ckpt: Path) -> dict | None:
    """The training run's summary.json (run_dir/checkpoints/<ckpt> -> run_dir/summary.json), if any."""
    try:
        return json.loads((ckpt.absolute().parent.parent / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _is_ours(name: str) -> bool:
    return name in (CONFIG, META, CARD, V1_WEIGHTS) or (
        name.startswith(WEIGHTS_PREFIX) and name.endswith((".safetensors", ".safetensors.index.json"))
    )


def _read_meta(d: Path) -> dict | None:
    """surf.json (format 2) or the metadata-holding config.json of format 1; None when neither is ours."""
    for name in (META, CONFIG):
        try:
            meta = json.loads((d / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            return meta
    return None


def is_export(d: str | os.PathLike) -> bool:
    """A directory this module wrote: our metadata and nothing but our own files."""
    d = Path(d)
    return d.is_dir() and _read_meta(d) is not None and all(_is_ours(p.name) for p in d.iterdir())


def _check_out_dir(out: Path) -> None:
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"output {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ConfigError(
            f"output {out} is a non-empty directory that is not an exported Refiner; "
            f"refusing to replace it (choose a new directory)"
        )


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors in dtype, except the modules the Refiner keeps in float32 (as from_pretrained(torch_dtype=))."""
    return {k: v.to(Refiner.keeps_fp32(k, dtype)).contiguous() for k, v in tensors.items()}


def _shapes(cfg: RefinerConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return shapes(Refiner.from_cfg(cfg).state_dict())


def save_refiner(tensors: dict[str, torch.Tensor], cfg: RefinerConfig, out_dir: str | os.PathLike, **meta) -> Path:
    """Write an exported Refiner directory atomically: beside it under a temporary name, then swapped in.

    `meta` goes to surf.json (bridge, trained_on, step, weights, dtype (storage, default float32), ...; `run`,
    the run's summary, only to the model card). Only an empty directory or an earlier export is ever
    replaced, never anything the user put there."""
    run = meta.pop("run", None)
    meta = {"format": FORMAT, "version": VERSION, "bridge": {}, "dtype": "float32", **meta}
    if meta["dtype"] not in DTYPES:
        raise ConfigError(f"dtype {meta['dtype']!r}: choose from {list(DTYPES)}")
    out = Path(out_dir)
    _check_out_dir(out)
    cfg = dataclasses.replace(cfg, grad_checkpointing=False)
    with torch.device("meta"):
        net = Refiner.from_cfg(cfg)
    check_weights(shapes(net.state_dict()), shapes(tensors), str(out))
    net.load_state_dict(_cast(tensors, DTYPES[meta["dtype"]]), assign=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own pid's leftover only
    try:
        tmp.mkdir(parents=True)
        net.save_pretrained(tmp, safe_serialization=True)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        (tmp / CARD).write_text(model_card(cfg, meta, run, num_params(net)))
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


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def model_card(cfg: RefinerConfig, meta: dict, run: dict | None, n_params: int) -> str:
    """README.md of an export: base model, data, steps, validation figures (from the run's summary.json)."""
    on = meta.get("trained_on") or {}
    base = on.get("base") or {}
    front = ["---", "library_name: diffusers", "tags: [surf, video, super-resolution, refiner]"]
    if base.get("id") and "/" in str(base["id"]):
        front.append(f"base_model: {base['id']}")
    lines = [
        *front,
        "---",
        "",
        "# SURF Refiner",
        "",
        "Maps an upsampled low-resolution preview latent of a frozen video DiT to its high-resolution latent "
        "by a few Euler steps of a bridge flow (SURF, arXiv 2603.21002). Trained with `surf_train`.",
        "",
        "| | |",
        "|---|---|",
    ]
    if base:
        rev = f" @ `{base['revision']}`" if base.get("revision") else ""
        lines.append(f"| base model | {base.get('name')} (`{base.get('id')}`{rev}, {base.get('family')} family) |")
    else:
        lines.append("| base model | not recorded |")
    if on.get("preview_latent"):
        lines.append(
            f"| data | preview latent {on.get('preview_latent')} -> target latent {on.get('target_latent')} "
            f"(F, H, W; {on.get('latent_channels')} channels), preview size {on.get('preview_size')} -> "
            f"target size {on.get('target_size')} |"
        )
    lines += [
        f"| steps | {meta.get('step')} ({meta.get('weights', 'given')} weights, stored as {meta['dtype']}) |",
        f"| architecture | {n_params / 1e6:.2f}M parameters: dim {cfg.dim}, depth {cfg.depth}, heads "
        f"{cfg.heads}, window {list(cfg.window)}, patch {list(cfg.patch_size)}, text_dim {cfg.text_dim} |",
        f"| sampler | {meta.get('bridge', {}).get('steps', 10)} Euler steps |",
        "",
        "## Validation",
        "",
    ]
    if run:
        ref, up = run.get("val_mse_refiner"), run.get("val_mse_upsample")
        ratio = f" (ratio {ref / up:.3f})" if isinstance(ref, float) and isinstance(up, float) and up > 0 else ""
        val = (
            f"validation latent MSE refiner {_fmt(ref)} vs upsampled preview {_fmt(up)}{ratio}"
            if ref is not None
            else "no validation"
        )
        lines += [
            f"From the run's summary.json at step {run.get('steps')}: {val}; training loss "
            f"{_fmt(run.get('train_loss_first'))} -> {_fmt(run.get('train_loss_last'))}. Against generated "
            f"pairs latent MSE is a weak signal: judge with `python -m surf_train.evaluate` too."
        ]
    else:
        lines.append("No summary.json beside the checkpoint's run: no validation figures.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from surf_train.refiner import Refiner",
        "",
        'net = Refiner.from_pretrained("path/to/this/directory", torch_dtype=torch.bfloat16)',
        "```",
        "",
        'or `python -m surf_train.generate --refiner path/to/this/directory --prompt "..."`. '
        "`surf.json` holds the sampler settings and the base-model record that generate checks.",
        "",
    ]
    return "\n".join(lines)


def _file_shapes(d: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of save_pretrained's safetensors file(s), read from their headers (no tensor bytes)."""
    index = d / f"{WEIGHTS_PREFIX}.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else [f"{WEIGHTS_PREFIX}.safetensors"]
    )
    out = {}
    for name in files:
        with safe_open(str(d / name), framework="pt") as f:
            out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out


def load_refiner(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    subfolder: str | None = None,
) -> tuple[Refiner, dict]:
    """Rebuild an exported Refiner (eval mode, no grad) and return it with its metadata (surf.json and
    "refiner": its config). dtype None: as stored; the modules kept in float32 stay float32."""
    d = Path(directory) / (subfolder or "")
    if (d / V1_WEIGHTS).is_file():
        return _load_v1(d, device, dtype)
    meta = _read_meta(d)
    if meta is None or not (d / CONFIG).is_file():
        raise ConfigError(
            f"{d}: not an exported Refiner (needs {CONFIG} and {META}); make one with python -m surf_train.export"
        )
    try:
        config = {k: v for k, v in Refiner.load_config(d).items() if not k.startswith("_")}
        got = _file_shapes(d)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{d}: unreadable Refiner config or weights ({type(e).__name__}: {e})") from None
    check_weights(_shapes(RefinerConfig.from_dict(config)), got, str(d))
    net = Refiner.from_pretrained(directory, subfolder=subfolder, torch_dtype=dtype or DTYPES[meta["dtype"]])
    net = net.to(device).eval().requires_grad_(False)
    return net, {**meta, "refiner": net.cfg.to_dict()}


def _load_v1(d: Path, device, dtype) -> tuple[Refiner, dict]:
    """Format 1: refiner.safetensors + a config.json holding the RefinerConfig and the metadata."""
    meta = _read_meta(d)
    if meta is None or "refiner" not in meta:
        raise ConfigError(f"{d / CONFIG}: not the config of an exported Refiner (format {FORMAT!r})")
    cfg = RefinerConfig.from_dict(meta["refiner"])
    tensors = load_file(str(d / V1_WEIGHTS))
    check_weights(_shapes(cfg), shapes(tensors), str(d / V1_WEIGHTS))
    with torch.device("meta"):
        net = Refiner.from_cfg(cfg)
    net.load_state_dict(_cast(tensors, dtype or DTYPES[meta.get("dtype", "float32")]), assign=True)
    return net.to(device).eval().requires_grad_(False), meta


def convert(old: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """An export of any format -> this format (same tensors, same metadata)."""
    net, meta = load_refiner(old)
    keep = {k: v for k, v in meta.items() if k not in ("format", "version", "refiner")}
    return save_refiner(net.state_dict(), net.cfg, out_dir, **keep)


def check_base(meta: dict, spec, where: str, force: bool = False) -> str | None:
    """Refuse a Refiner trained on another base model than `spec` (a BaseSpec); returns a warning or None.

    Two families can share a channel count (Wan and HunyuanVideo: 16), so the record decides, not shapes."""
    channels = meta.get("refiner", {}).get("in_channels")
    if channels != spec.channels:
        raise ConfigError(f"{where} works on {channels}-channel latents but base model {spec.name} has {spec.channels}")
    rec = (meta.get("trained_on") or {}).get("base")
    if not rec:
        return f"{where} records no base model (exported before the record existed): not checked"
    want = {"id": spec.model_id, "revision": spec.revision, "family": spec.family}
    got = {k: rec.get(k) for k in want}
    if got != want and not force:
        diff = ", ".join(f"{k} {got[k]!r} (base {want[k]!r})" for k in want if got[k] != want[k])
        raise ConfigError(
            f"{where} was trained on base model {rec.get('name')!r}, not {spec.name!r}: {diff}; "
            f"pass --force to use it anyway"
        )
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m surf_train.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "checkpoint",
        help="Lightning .ckpt file or DeepSpeed checkpoint directory "
        "(e.g. runs/tiny/checkpoints/last.ckpt); with --convert: an earlier export",
    )
    ap.add_argument("out_dir", help="output directory: new, empty, or an earlier export (which is replaced)")
    ap.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "ema", "raw"],
        help="EMA or raw weights (auto: EMA when the checkpoint has it)",
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="storage dtype of the weights (norms, adaLN tables and the time MLP stay float32)",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Refiner steps K that generation and evaluation default to (default: the run's validation K)",
    )
    ap.add_argument(
        "--start-noise",
        type=float,
        default=None,
        help="start-point noise of the sampler (bridge sigma_aug_eval; default: the run's validation value)",
    )
    ap.add_argument(
        "--consistency",
        choices=["on", "off"],
        default=None,
        help="on: the sampler projects its output onto the preview (bridge consistency; default: the run's)",
    )
    ap.add_argument(
        "--convert",
        action="store_true",
        help="rewrite an export of the first format (refiner.safetensors + config.json) in this one",
    )
    a = ap.parse_args(argv)
    try:
        out = (
            convert(a.checkpoint, a.out_dir)
            if a.convert
            else export(
                a.checkpoint,
                a.out_dir,
                a.weights,
                a.dtype,
                a.steps,
                a.start_noise,
                None if a.consistency is None else a.consistency == "on",
            )
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    meta = json.loads((out / META).read_text())
    print(f"exported {meta.get('weights', 'given')} weights of step {meta.get('step')} ({meta['dtype']}) -> {out}")


if __name__ == "__main__":
    main()
