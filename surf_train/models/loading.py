"""Loading an exported Refiner directory: the format's file names, its metadata, the weights checked against the
config before anything is built, and the check that it was trained on the base model it is used with.

The directory is Refiner.save_pretrained's (config.json + diffusion_pytorch_model.safetensors), plus surf.json
(what sampling needs beside the weights: the sampler settings, the base model it was trained on, step, which
weights) and a model card README.md. Loading needs no Hydra, Lightning, DeepSpeed or W&B; nothing is unpickled.
Exports of the first format (refiner.safetensors + config.json) still load. Writing one: surf_train.training.export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from surf_train.common.dtypes import DTYPES
from surf_train.common.errors import ConfigError
from surf_train.models.refiner import Refiner, RefinerConfig

FORMAT, VERSION = "surf-refiner", 2
CONFIG, META, CARD = "config.json", "surf.json", "README.md"
WEIGHTS_PREFIX = "diffusion_pytorch_model"  # save_pretrained's file (or shards + index)
V1_WEIGHTS = "refiner.safetensors"  # version 1: refiner.safetensors + config.json holding all metadata


def is_ours(name: str) -> bool:
    return name in (CONFIG, META, CARD, V1_WEIGHTS) or (
        name.startswith(WEIGHTS_PREFIX) and name.endswith((".safetensors", ".safetensors.index.json"))
    )


def read_meta(d: Path) -> dict | None:
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
    return d.is_dir() and read_meta(d) is not None and all(is_ours(p.name) for p in d.iterdir())


def cast_weights(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors in dtype, except the modules the Refiner keeps in float32 (as from_pretrained(torch_dtype=))."""
    return {k: v.to(Refiner.keeps_fp32(k, dtype)).contiguous() for k, v in tensors.items()}


def refiner_shapes(cfg: RefinerConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return shapes(Refiner.from_cfg(cfg).state_dict())


def _filerefiner_shapes(d: Path) -> dict[str, tuple[int, ...]]:
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


def export_dir(source: str | os.PathLike, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The local directory of an export: `source` itself, or the snapshot of a Hugging Face Hub id ("org/name",
    fetched or, with HF_HUB_OFFLINE=1, found in the Hub cache), then `subfolder` inside it."""
    d = Path(source)
    if d.exists() or os.path.isabs(source) or str(source).count("/") != 1:
        return d / (subfolder or "")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        root = snapshot_download(
            str(source), revision=revision, allow_patterns=[f"{subfolder}/*"] if subfolder else None
        )
    except HFValidationError:
        raise ConfigError(f"{source}: no such directory, and not a Hugging Face Hub id") from None
    except (OSError, ValueError) as e:  # offline and not cached, not found, no access (HTTP errors are OSErrors)
        said = " ".join(str(e).split())  # one line: huggingface_hub's messages can span several
        raise ConfigError(
            f"{source}: no such directory, and not loadable from the Hub ({type(e).__name__}: {said})"
        ) from None
    return Path(root) / (subfolder or "")


def load_refiner(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
) -> tuple[Refiner, dict]:
    """Rebuild an exported Refiner (eval mode, no grad) and return it with its metadata (surf.json and
    "refiner": its config). `directory` may be a Hub id ("org/name", with `subfolder` and `revision`). dtype None:
    as stored; the modules kept in float32 stay float32."""
    d = export_dir(directory, subfolder, revision)
    if (d / V1_WEIGHTS).is_file():
        return _load_v1(d, device, dtype)
    meta = read_meta(d)
    if meta is None or not (d / CONFIG).is_file():
        raise ConfigError(
            f"{d}: not an exported Refiner (needs {CONFIG} and {META}); make one with python -m surf_train.export"
        )
    try:
        config = {k: v for k, v in Refiner.load_config(d).items() if not k.startswith("_")}
        got = _filerefiner_shapes(d)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{d}: unreadable Refiner config or weights ({type(e).__name__}: {e})") from None
    check_weights(refiner_shapes(RefinerConfig.from_dict(config)), got, str(d))
    net = Refiner.from_pretrained(d, torch_dtype=dtype or DTYPES[meta["dtype"]])
    net = net.to(device).eval().requires_grad_(False)
    return net, {**meta, "refiner": net.cfg.to_dict()}


def _load_v1(d: Path, device, dtype) -> tuple[Refiner, dict]:
    """Format 1: refiner.safetensors + a config.json holding the RefinerConfig and the metadata."""
    meta = read_meta(d)
    if meta is None or "refiner" not in meta:
        raise ConfigError(f"{d / CONFIG}: not the config of an exported Refiner (format {FORMAT!r})")
    cfg = RefinerConfig.from_dict(meta["refiner"])
    tensors = load_file(str(d / V1_WEIGHTS))
    check_weights(refiner_shapes(cfg), shapes(tensors), str(d / V1_WEIGHTS))
    with torch.device("meta"):
        net = Refiner.from_cfg(cfg)
    net.load_state_dict(cast_weights(tensors, dtype or DTYPES[meta.get("dtype", "float32")]), assign=True)
    return net.to(device).eval().requires_grad_(False), meta


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


def check_weights(want: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise ConfigError naming the keys and shapes where weights (`got`) and the config's shapes (`want`)
    disagree."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if tuple(want[k]) != tuple(got[k]))
    if missing or extra or bad:
        detail = "; ".join(
            filter(
                None,
                [
                    f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}" if missing else "",
                    f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}" if extra else "",
                    ", ".join(f"{k}: weights {tuple(got[k])} vs config {tuple(want[k])}" for k in bad[:4]),
                ],
            )
        )
        raise ConfigError(f"{where}: weights do not match the Refiner config ({detail})")


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}
