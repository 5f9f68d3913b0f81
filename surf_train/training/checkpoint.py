"""Reading training checkpoints (Lightning `.ckpt` files, DeepSpeed ZeRO-2 directories) without unpickling.

Used by the export and by progressive training's `init_from`; imports neither of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from surf_train.common.errors import ConfigError

EMA_PREFIX, NET_PREFIX = "ema.module.", "net."


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(state dict of the LightningModule, its hyper-parameters, global step) from a .ckpt or ZeRO dir.

    The float32 EMA kept beside the module (surf_train.training.module.EMA) appears as ema.module.* entries."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    f = path / "checkpoint" / "mp_rank_00_model_states.pt" if path.is_dir() else path
    if not f.is_file():
        raise ConfigError(f"{path}: neither a Lightning checkpoint file nor a DeepSpeed checkpoint directory")
    try:
        ck = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"{f}: cannot be read as a checkpoint without unpickling objects ({type(e).__name__})"
        ) from None
    if not isinstance(ck, dict):
        raise ConfigError(f"{f}: not a training checkpoint")
    state = ck.get("state_dict", ck.get("module"))
    hp = ck.get("hyper_parameters")
    ema = ck.get("ema")
    if isinstance(state, dict) and isinstance(ema, dict) and isinstance(ema.get("state_dict"), dict):
        state = {**state, **{f"{EMA_PREFIX}{k}": v for k, v in ema["state_dict"].items()}}
    if (
        not isinstance(state, dict)
        or not isinstance(hp, dict)
        or "model" not in hp
        or not any(k.startswith(NET_PREFIX) for k in state)
    ):
        raise ConfigError(f"{path}: not a surf_train Refiner checkpoint (no net.* weights or model settings)")
    if path.is_dir() and any(v.numel() == 0 for k, v in state.items() if k.startswith(NET_PREFIX)):
        raise ConfigError(
            f"{path}: ZeRO-3 checkpoint (parameters are partitioned); convert it first with "
            f"lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict "
            f"and export the resulting file"
        )
    return state, hp, int(ck.get("global_step", -1))


def refiner_weights(
    state: dict[str, torch.Tensor], weights: str = "auto", where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str]:
    """The Refiner's tensors of a checkpoint state dict: "ema", "raw" or "auto" (EMA when present)."""
    has_ema = any(k.startswith(EMA_PREFIX) for k in state)
    if weights == "auto":
        weights = "ema" if has_ema else "raw"
    if weights not in ("ema", "raw"):
        raise ConfigError(f"--weights {weights!r}: choose ema, raw or auto")
    if weights == "ema" and not has_ema:
        raise ConfigError(
            f"{where}: no EMA weights in this checkpoint (trained with module.ema_decay=null); use --weights raw"
        )
    prefix = EMA_PREFIX if weights == "ema" else NET_PREFIX
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, weights
