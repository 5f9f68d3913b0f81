"""The published base models the cost model knows by name: their transformer configs, text lengths, CFG use,
the paper's reported numbers, and their VAE decode cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from surf_train.common.errors import ConfigError
from surf_train.cost.formulas import FLOPS_OF, HUNYUAN15_DEFAULTS, HUNYUAN_DEFAULTS, WAN_DEFAULTS

# Transformer configs of the released checkpoints (transformer/config.json on the public model cards;
# nothing is downloaded here), with the keys diffusers' WanTransformer3DModel and
# HunyuanVideoTransformer3DModel take.
ARCH: dict[str, dict[str, Any]] = {
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers: dim 1536 = 12 x 128, ffn 8960, 30 layers.
    "wan2.1_t2v_1.3b": {**WAN_DEFAULTS, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    # Wan-AI/Wan2.1-T2V-14B-Diffusers: dim 5120 = 40 x 128, ffn 13824, 40 layers.
    "wan2.1_t2v_14b": dict(WAN_DEFAULTS),
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts of the 14B's shape (diffusers' convert_wan_to_diffusers.py);
    # one of them runs per step, so a step costs what a 14B step costs.
    "wan2.2_t2v_a14b": dict(WAN_DEFAULTS),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers: dim 3072 = 24 x 128, ffn 14336, 30 layers, 48 latent channels (diffusers'
    # scripts/convert_wan_to_diffusers.py, Wan2.2-TI2V-5B; Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py), and the
    # pipeline's expand_timesteps=True (a timestep per token: the time embedding runs on every token).
    "wan2.2_ti2v_5b": {
        **WAN_DEFAULTS,
        "num_attention_heads": 24,
        "in_channels": 48,
        "out_channels": 48,
        "ffn_dim": 14336,
        "num_layers": 30,
        "expand_timesteps": True,
    },
    # hunyuanvideo-community/HunyuanVideo: 20 double + 40 single blocks, 24 x 128, Llama 4096, CLIP 768.
    "hunyuan_video": dict(HUNYUAN_DEFAULTS),
    # hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v: 54 double blocks, 16 x 128, Qwen2.5-VL 3584, ByT5
    # 1472, in 65 = 2 x 32 + 1 (diffusers' conversion script: the constructor defaults, target_size 960, t2v).
    "hunyuan_video15_720p_t2v": {**HUNYUAN15_DEFAULTS, "target_size": 960, "task_type": "t2v"},
}
# VAE configs that differ from diffusers' defaults (the Wan 2.1 / HunyuanVideo VAEs): the Wan 2.2 VAE of TI2V-5B,
# as diffusers' scripts/convert_wan_to_diffusers.py builds it (vae22_diffusers_config less the latent statistics,
# which cost nothing, and clip_output, which 0.42's AutoencoderKLWan does not take).
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "wan2.2_ti2v_5b": dict(
        base_dim=160,
        decoder_base_dim=256,
        z_dim=48,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
    ),
}
# Text tokens each transformer call sees: the pipelines pad the prompt to these lengths and attention
# runs over the padded length (masked for HunyuanVideo), so the padded length is what is computed.
# HunyuanVideo-1.5: the Qwen length (tokenizer_max_length); its formula adds the glyph and image tokens.
TEXT_LEN = {"wan": 512, "hunyuan": 256, "hunyuan15": 1000}
CFG_FAMILIES = {"wan", "hunyuan15"}  # HunyuanVideo embeds the guidance scale: one call per step, no CFG batch.
# Refiner settings a family's latent needs beside the preset (conf/experiment/hunyuan15.yaml: 32 channels, and
# patch 1 because the stride-16 VAE's 45x80 latent at 720p is odd and already HunyuanVideo's token grid)
REFINER_FOR = {"hunyuan15": {"in_channels": 32, "patch_size": (1, 1, 1)}}

# Paper numbers (SURF, arXiv 2603.21002, Table 1 and abstract; Wan 2.1 14B, 720p, 81 frames).
PAPER = {
    "wan2.1_t2v_14b": {
        "baseline_pflops": 658.46,
        "surf_pflops": 34.3,
        "baseline_s": 3497,
        "surf_s": 278,
        "speedup_time": 12.58,
    },
    "hunyuan_video": {"speedup_time": 8.7},
}


@dataclass(frozen=True)
class BaseArch:
    """What the cost model needs of a base model: family, transformer config and VAE geometry."""

    name: str
    family: str
    config: dict[str, Any]
    channels: int
    stride_t: int
    stride_s: int
    patch_t: int
    patch_s: int

    @classmethod
    def from_name(cls, name: str) -> BaseArch:
        """Geometry from conf/base/<name>.yaml, transformer config from ARCH."""
        from surf_train.base.adapter import BaseSpec

        if name not in ARCH:
            raise ConfigError(f"no architecture constants for base model {name!r}; known: {sorted(ARCH)}")
        spec = BaseSpec.from_name(name)
        return cls(
            name, spec.family, ARCH[name], spec.channels, spec.stride_t, spec.stride_s, spec.patch_t, spec.patch_s
        )

    @property
    def text_len(self) -> int:
        return TEXT_LEN[self.family]

    @property
    def cfg_factor(self) -> int:
        return 2 if self.family in CFG_FAMILIES else 1

    def latent(self, frames: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(C, F, H, W) latent of a video of `frames` frames and size (width, height) in pixels."""
        from surf_train.base.adapter import LatentGeometry

        w, h = size
        geo = LatentGeometry(self.channels, self.stride_t, self.stride_s, self.patch_t, self.patch_s)
        return geo.latent_shape(frames, h, w)

    def flops(self, latent: Sequence[int], text_len: int | None = None) -> dict[str, int]:
        """One transformer call (one CFG branch)."""
        return FLOPS_OF[self.family](self.config, latent, self.text_len if text_len is None else text_len)


def vae_decode_flops(name: str, latent: Sequence[int]) -> int:
    """Matmul/conv FLOPs of one VAE decode, counted by FlopCounterMode on the meta device.

    Builds diffusers' AutoencoderKLWan / AutoencoderKLHunyuanVideo with their default configs (the released
    Wan 2.1 and HunyuanVideo VAEs) or VAE_CONFIGS' on the meta device, so nothing is allocated; untiled decode.
    Takes a few seconds.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    family = BaseArch.from_name(name).family
    if family == "wan":
        from diffusers import AutoencoderKLWan as Vae
    elif family == "hunyuan15":
        from diffusers import AutoencoderKLHunyuanVideo15 as Vae
    else:
        from diffusers import AutoencoderKLHunyuanVideo as Vae
    with torch.device("meta"):
        vae = Vae(**VAE_CONFIGS.get(name, {}))
    z = torch.empty(1, *latent, device="meta")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vae.decode(z, return_dict=False)
    return int(counter.get_total_flops())
