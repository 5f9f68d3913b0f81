"""A base model's VAE on its own, with its family's latent normalisation.

Validation videos only decode latents, so they load this and never the transformer or the text encoders
(with `+experiment=wan` those are the 14B DiT and umT5-XXL, about 40 GB beside a training Refiner).
The base-model adapters encode and decode through the same functions.
"""

from __future__ import annotations

import torch

from surf_train.common.dtypes import DTYPES


def vae_class(spec):
    """The diffusers VAE class of a base model (the toy world's exact latent when spec.vae_class says so)."""
    if spec.vae_class == "pixel_shuffle":
        from surf_train.base.toy_vae import PixelShuffleVAE

        return PixelShuffleVAE
    if spec.family == "wan":
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan
    if spec.family == "hunyuan15":
        from diffusers import AutoencoderKLHunyuanVideo15

        return AutoencoderKLHunyuanVideo15
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo


def load_vae_module(spec):
    """The VAE alone: the tiny one from its config (same weights as in the tiny pipeline), else from_pretrained."""
    if spec.pretrained is None:
        from surf_train.base import tiny

        if spec.tiny is not None:
            return tiny.TINY_BUILDS[spec.tiny][1]()
        builders = {"wan": tiny.tiny_wan_vae, "hunyuan": tiny.tiny_hunyuan_vae, "hunyuan15": tiny.tiny_hunyuan15_vae}
        return builders[spec.family]()
    return vae_class(spec).from_pretrained(
        spec.source, subfolder="vae", revision=spec.revision, dtype=DTYPES[spec.vae_dtype]
    )


def normalise(family: str, vae, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> the latent the transformer works on (Wan: per-channel mean/std; HunyuanVideo and 1.5: a
    scale, `scaling_factor` of the VAE's config, as both pipelines divide by it before decoding)."""
    if family == "wan":
        mean, std = _wan_stats(vae, z)
        return (z - mean) / std
    return z * vae.config.scaling_factor


def denormalise(family: str, vae, latent: torch.Tensor) -> torch.Tensor:
    """Inverse of normalise."""
    if family == "wan":
        mean, std = _wan_stats(vae, latent)
        return latent * std + mean
    return latent / vae.config.scaling_factor


def _wan_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = vae.config
    shape = (1, c.z_dim, 1, 1, 1)
    mean = torch.tensor(c.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(c.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


@torch.no_grad()
def encode(
    family: str, vae, video: torch.Tensor, device, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, 3, frames, H, W) in [-1, 1] -> normalised latent (B, C, F, H/s, W/s) float32."""
    dist = vae.encode(video.to(device, vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    return normalise(family, vae, z.float())


@torch.no_grad()
def decode(family: str, vae, latent: torch.Tensor, device) -> torch.Tensor:
    """Normalised latent (B, C, F, H, W) -> video (B, 3, frames, H*s, W*s) in [-1, 1] float32."""
    z = denormalise(family, vae, latent.float().to(device))
    return vae.decode(z.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)


def to_frames(video: torch.Tensor, output_type: str = "np"):
    """Decoded video (B, 3, frames, H, W) in [-1, 1] -> frames for export, by diffusers' VideoProcessor (as the
    pipelines do): "np" (B, frames, H, W, 3) float32 in [0, 1], "pil" a list per video of PIL images."""
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(do_resize=False).postprocess_video(video.float().cpu(), output_type=output_type)


class LatentDecoder:
    """Decodes a base model's normalised latents with its VAE alone; tiled where the VAE supports it.

    diffusers' tiled decode (`enable_tiling`) works tile by tile with overlapping blends above its minimum
    tile size (Wan: 256 px), so a 720p validation clip needs a tile's activations, not the whole frame's."""

    def __init__(self, spec, device: str | torch.device = "cpu", tiling: bool = True):
        self.spec, self.device = spec, torch.device(device)
        self.vae = load_vae_module(spec).to(self.device).requires_grad_(False).eval()
        if tiling and hasattr(self.vae, "enable_tiling"):
            self.vae.enable_tiling()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return decode(self.spec.family, self.vae, latent, self.device)
