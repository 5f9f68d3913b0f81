"""Frozen flow-matching video DiTs behind one small interface (`adapter.BaseModel`, one adapter per family:
`wan`, `hunyuan`, `hunyuan15`), their constants (`spec.BaseSpec`, or read off a pipeline's components:
`components`), the factory that builds one, their VAEs (`vae`, `toy_vae`), tiny download-free
components (`tiny`), and sampling with the base model's own scheduler, noise reshifting included (`sampling`).
May import `common` only."""

import torch

from surf_train.base.adapter import Acceleration, BaseModel, BaseSpec, Cond, LatentGeometry, Meter, latent_frames
from surf_train.common.dist_env import local_rank
from surf_train.common.errors import ConfigError

__all__ = [
    "Acceleration",
    "BaseModel",
    "BaseSpec",
    "Cond",
    "LatentGeometry",
    "Meter",
    "adapter_class",
    "latent_frames",
    "load_base_model",
]


def load_base_model(spec: BaseSpec, device: str | torch.device = "auto") -> BaseModel:
    """Build the adapter for `spec`: tiny from configs, otherwise diffusers `from_pretrained`."""
    if device == "auto":  # one GPU per process: torchrun's LOCAL_RANK or SLURM_LOCALID picks it
        device = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r}: not a torch device (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu or auto")
    return adapter_class(spec.family).load(spec, device)


def adapter_class(family: str) -> type[BaseModel]:
    """The BaseModel subclass of a family (wan | hunyuan | hunyuan15)."""
    if family == "wan":
        from surf_train.base.wan import WanBase

        return WanBase
    if family == "hunyuan15":
        from surf_train.base.hunyuan15 import Hunyuan15Base

        return Hunyuan15Base
    from surf_train.base.hunyuan import HunyuanBase

    return HunyuanBase
