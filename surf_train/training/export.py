"""Training checkpoint -> an exported Refiner directory (format: surf_train.models.loading), written atomically,
with a model card; and the conversion of a first-format export to this one."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from surf_train.common.dtypes import DTYPES
from surf_train.common.errors import ConfigError
from surf_train.models.loading import (
    CARD,
    FORMAT,
    META,
    VERSION,
    cast_weights,
    check_weights,
    is_export,
    load_refiner,
    refiner_shapes,
    shapes,
)
from surf_train.models.refiner import Refiner, RefinerConfig, num_params, refiner_config
from surf_train.models.sampler import RefinerSampler
from surf_train.training.checkpoint import read_checkpoint, refiner_weights
from surf_train.training.distill import provenance


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
    state, hp, step = read_checkpoint(ckpt)
    tensors, weights = refiner_weights(state, weights, str(ckpt))
    cfg = refiner_config(hp["model"])
    check_weights(refiner_shapes(cfg), shapes(tensors), str(ckpt))
    return save_refiner(
        tensors,
        cfg,
        out_dir,
        bridge=_with_sampler(hp.get("bridge") or {}, steps, start_noise, consistency),
        weights=weights,
        dtype=dtype,
        step=step,
        source=Path(ckpt).name,  # the file name only: an absolute path would publish the training machine's layout
        trained_on=hp.get("trained_on"),
        run=_run_summary(Path(ckpt)),
        **({"distilled_from": provenance(hp["distill"])} if hp.get("distill") else {}),
    )


def _with_sampler(bridge: dict, steps: int | None, start_noise: float | None, consistency: bool | None) -> dict:
    """The run's bridge record with the sampler settings given (not None) replaced."""
    sampler = RefinerSampler.from_bridge(bridge).override(steps=steps, start_noise=start_noise, consistency=consistency)
    return {**bridge, **sampler.bridge_record()}


def _run_summary(ckpt: Path) -> dict | None:
    """The training run's summary.json (run_dir/checkpoints/<ckpt> -> run_dir/summary.json), if any."""
    try:
        return json.loads((ckpt.absolute().parent.parent / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _check_out_dir(out: Path) -> None:
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"output {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ConfigError(
            f"output {out} is a non-empty directory that is not an exported Refiner; "
            f"refusing to replace it (choose a new directory)"
        )


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
    net.load_state_dict(cast_weights(tensors, DTYPES[meta["dtype"]]), assign=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own pid's leftover only
    try:
        tmp.mkdir(parents=True)
        net.save_pretrained(tmp, safe_serialization=True)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        (tmp / CARD).write_text(model_card(cfg, meta, run, num_params(net)))
        _shareable(tmp)
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


def _shareable(d: Path) -> None:
    """Every file of d readable as the user's umask allows, as config.json is: safetensors writes its weights
    0600, which colleagues on a shared cluster cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for f in d.iterdir():
        f.chmod(0o666 & ~umask)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


CARD_TAGS = ["surf", "video", "super-resolution", "refiner"]


def hub_id(base: dict) -> str | None:
    """The base model's Hugging Face Hub id ("org/name") from its record, None for a local directory (such as the
    shipped assets/toy_base) or a tiny download-free model: the card's base_model must name a Hub model."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from surf_train import CONF_DIR

    rid = base.get("id")
    if not isinstance(rid, str) or rid.count("/") != 1 or os.path.isabs(rid) or (CONF_DIR.parent / rid).exists():
        return None
    try:
        validate_repo_id(rid)
    except HFValidationError:
        return None
    return rid


def model_card(cfg: RefinerConfig, meta: dict, run: dict | None, n_params: int) -> str:
    """README.md of an export: base model, data, steps, validation figures (from the run's summary.json).

    The YAML front matter is huggingface_hub's ModelCardData, completed by diffusers' populate_model_card (library
    name, tags), as diffusers' push_to_hub completes a card; base_model where the base is a Hub model."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=hub_id((meta.get("trained_on") or {}).get("base") or {}))
    card = populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n"), tags=CARD_TAGS)
    lines = [
        str(card).rstrip("\n"),
        "",
        "# SURF Refiner",
        "",
        "Maps an upsampled low-resolution preview latent of a frozen video DiT to its high-resolution latent "
        "by a few Euler steps of a bridge flow (SURF, arXiv 2603.21002). Trained with `surf_train`.",
        "",
        *_card_table(cfg, meta, n_params),
        "",
        "## Validation",
        "",
        _card_validation(run),
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from surf_train.models.refiner import Refiner",
        "",
        'net = Refiner.from_pretrained("path/to/this/directory", torch_dtype=torch.bfloat16)',
        "```",
        "",
        'or `python -m surf_train.generate --refiner path/to/this/directory --prompt "..."`. '
        "`surf.json` holds the sampler settings and the base-model record that generate checks.",
        "",
    ]
    return "\n".join(lines)


def _card_table(cfg: RefinerConfig, meta: dict, n_params: int) -> list[str]:
    """The model card's table: base model, data, steps, architecture, sampler."""
    on = meta.get("trained_on") or {}
    base = on.get("base") or {}
    lines = ["| | |", "|---|---|"]
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
        f"| sampler | {RefinerSampler.from_bridge(meta.get('bridge', {})).steps} Euler steps |",
    ]
    return lines + _card_distilled(meta.get("distilled_from"))


def _card_distilled(d: dict | None) -> list[str]:
    """The model card's row for a distilled student (module.distill), none otherwise."""
    if not d:
        return []
    return [f"| distilled from | `{d.get('teacher')}`, into {d.get('steps')} step(s), gt_weight {d.get('gt_weight')} |"]


def _card_validation(run: dict | None) -> str:
    """The model card's validation line, from the run's summary.json."""
    if not run:
        return "No summary.json beside the checkpoint's run: no validation figures."
    ref, up = run.get("val_mse_refiner"), run.get("val_mse_upsample")
    ratio = f" (ratio {ref / up:.3f})" if isinstance(ref, float) and isinstance(up, float) and up > 0 else ""
    val = (
        f"validation latent MSE refiner {_fmt(ref)} vs upsampled preview {_fmt(up)}{ratio}"
        if ref is not None
        else "no validation"
    )
    return (
        f"From the run's summary.json at step {run.get('steps')}: {val}; training loss "
        f"{_fmt(run.get('train_loss_first'))} -> {_fmt(run.get('train_loss_last'))}. Against generated "
        f"pairs latent MSE is a weak signal: judge with `python -m surf_train.evaluate` too."
    )


def convert(old: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """An export of any format -> this format (same tensors, same metadata)."""
    net, meta = load_refiner(old)
    keep = {k: v for k, v in meta.items() if k not in ("format", "version", "refiner")}
    return save_refiner(net.state_dict(), net.cfg, out_dir, **keep)
