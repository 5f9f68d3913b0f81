"""An exact, invertible "VAE" for the toy world: space-to-depth by `stride` (pixel unshuffle).

It has the interface WanPipeline and WanBase use from AutoencoderKLWan (`encode(x).latent_dist`,
`decode(z, return_dict=False)`, config `z_dim`, `latents_mean`, `latents_std`, `scale_factor_*`), so the
toy base model goes through the same adapter, normalisation and `from_pretrained` path as Wan 2.1.
Decoding is the exact inverse of encoding, so the toy world's detector reads generated latents losslessly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """(B, 3, F, H, W) <-> (B, 3 * stride^2, F, H / stride, W / stride); no temporal compression."""

    @register_to_config
    def __init__(
        self,
        stride: int = 2,
        in_channels: int = 3,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        z_dim: int | None = None,
        scale_factor_spatial: int | None = None,
        scale_factor_temporal: int = 1,
    ):
        super().__init__()
        z = in_channels * stride * stride
        if (z_dim or z, scale_factor_spatial or stride, scale_factor_temporal) != (z, stride, 1):
            raise ValueError(
                f"PixelShuffleVAE config: z_dim={z_dim}, scale_factor_spatial={scale_factor_spatial}, "
                f"scale_factor_temporal={scale_factor_temporal} disagree with stride {stride}"
            )
        # WanPipeline and WanBase read these from the config, as they do from AutoencoderKLWan's
        self.register_to_config(
            z_dim=z,
            scale_factor_spatial=stride,
            scale_factor_temporal=1,
            latents_mean=list(latents_mean or [0.0] * z),
            latents_std=list(latents_std or [1.0] * z),
        )
        # no weights; this buffer carries device and dtype, and gives save_pretrained a weights file to write
        self.register_buffer("anchor", torch.zeros(()))

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        b, c, f, h, w = x.shape
        s = self.config.stride
        if h % s or w % s:
            raise ValueError(f"PixelShuffleVAE: height {h} and width {w} must be multiples of {s}")
        z = F.pixel_unshuffle(x.transpose(1, 2).reshape(b * f, c, h, w), s)
        z = z.reshape(b, f, -1, h // s, w // s).transpose(1, 2)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], 1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        b, c, f, h, w = z.shape
        s = self.config.stride
        x = F.pixel_shuffle(z.transpose(1, 2).reshape(b * f, c, h, w), s)
        x = x.reshape(b, f, -1, h * s, w * s).transpose(1, 2)
        return DecoderOutput(sample=x) if return_dict else (x,)
