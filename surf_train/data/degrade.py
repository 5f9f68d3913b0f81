"""Preview degradations for pairs from real videos: a pixel chain, then latent noise and blur.

One pass of the Real-ESRGAN chain on the high-resolution clip: Gaussian blur -> downscale to the preview
size (random kernel) -> Gaussian noise -> JPEG compression per frame. The preview VAE latent then gets
Gaussian blur and noise. Parameters are drawn per clip from configurable ranges with a seeded generator,
so a clip's preview is reproducible from (seed, key), and the drawn values go into the sample metadata.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from surf_train.base.sampling import DOWN_MODES, DownMode, resize_latent
from surf_train.common.config import check
from surf_train.common.errors import ConfigError, known_keys


@dataclass
class DegradeConfig:
    """Ranges [low, high] that each clip's degradation parameters are drawn from (uniformly)."""

    blur_prob: float = 0.7
    blur_sigma: tuple[float, float] = (0.4, 2.0)  # pixels at the target size
    down_modes: tuple[DownMode, ...] = DOWN_MODES  # downscale kernel, one drawn per clip
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.03)  # pixel values in [0, 1], at the preview size
    jpeg_prob: float = 0.7
    jpeg_quality: tuple[int, int] = (40, 95)
    latent_blur: tuple[float, float] = (0.0, 0.5)  # sigma in latent pixels
    latent_noise: tuple[float, float] = (0.0, 0.05)  # std in normalised latent units

    def __post_init__(self):
        for f in fields(self):  # YAML lists -> tuples
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        check(self, "degrade.")
        self.validate()

    @classmethod
    def from_dict(cls, d: dict | None) -> DegradeConfig:
        return cls(**known_keys(d, cls, "degrade"))

    def validate(self) -> None:
        for name in ("blur_prob", "noise_prob", "jpeg_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"degrade.{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("blur_sigma", "noise_std", "jpeg_quality", "latent_blur", "latent_noise"):
            r = getattr(self, name)
            if len(r) != 2 or not 0 <= r[0] <= r[1]:
                raise ConfigError(f"degrade.{name}={list(r)} must be [low, high] with 0 <= low <= high")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ConfigError(f"degrade.jpeg_quality={list(self.jpeg_quality)} must be within [1, 100]")
        bad = [m for m in self.down_modes if m not in DOWN_MODES]
        if bad or not self.down_modes:
            raise ConfigError(f"degrade.down_modes={list(self.down_modes)} must be a non-empty subset of {DOWN_MODES}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur over H and W of (B, C, F, H, W); sigma (B,) in latent pixels."""
    smax = float(sigma.max())
    if smax <= 0:
        return x
    r = max(1, math.ceil(3 * smax))
    taps = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)  # (K,)
    k = torch.exp(-0.5 * (taps[None] / sigma.clamp_min(1e-6)[:, None].to(x.dtype)) ** 2)  # (B, K)
    k = torch.where(sigma[:, None] > 0, k, (taps[None] == 0).to(x.dtype))
    k = k / k.sum(1, keepdim=True)
    b, c, f, h, w = x.shape
    y = x.permute(0, 2, 1, 3, 4).reshape(1, b * f * c, h, w)  # grouped conv: one group per (sample, frame, chan)
    kk = k.repeat_interleave(f * c, 0)  # (B*F*C, K)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), kk[:, None, :, None], groups=b * f * c)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), kk[:, None, None, :], groups=b * f * c)
    return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def _u(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def sample_params(cfg: DegradeConfig, gen: torch.Generator) -> dict:
    """One clip's degradation: every draw happens (fixed order), so each value depends only on the seed."""
    on = {
        k: float(torch.rand((), generator=gen, dtype=torch.float64)) < getattr(cfg, f"{k}_prob")
        for k in ("blur", "noise", "jpeg")
    }
    blur = _u(gen, *cfg.blur_sigma)
    mode = cfg.down_modes[int(torch.randint(len(cfg.down_modes), (), generator=gen))]
    noise = _u(gen, *cfg.noise_std)
    q = int(torch.randint(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1, (), generator=gen))
    return {
        "blur_sigma": blur if on["blur"] else 0.0,
        "down": mode,
        "noise_std": noise if on["noise"] else 0.0,
        "jpeg_quality": q if on["jpeg"] else None,
        "latent_blur": _u(gen, *cfg.latent_blur),
        "latent_noise": _u(gen, *cfg.latent_noise),
    }


def jpeg(video: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of every frame of (B, 3, F, H, W) in [0, 1] (4:2:0 chroma, as most encoders)."""
    from PIL import Image

    b, c, f, h, w = video.shape
    frames = (video.permute(0, 2, 3, 4, 1).reshape(b * f, h, w, c) * 255).round().clamp(0, 255)
    out = []
    for img in frames.to(torch.uint8).cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    y = torch.from_numpy(np.stack(out)).float().div(255).to(video.device)  # (B*F, H, W, 3)
    return y.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


def degrade_pixels(video: torch.Tensor, size: tuple[int, int], p: dict, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, F, H, W) in [0, 1] -> blur -> resize to `size` -> noise -> JPEG -> (B, 3, F, h, w) in [0, 1]."""
    b = video.shape[0]
    x = gaussian_blur(video, torch.full((b,), p["blur_sigma"], dtype=video.dtype, device=video.device))
    x = resize_latent(x, size, p["down"]).clamp(0, 1)  # per frame, H and W only
    if p["noise_std"] > 0:
        x = (x + p["noise_std"] * torch.randn(x.shape, generator=gen).to(x)).clamp(0, 1)
    if p["jpeg_quality"] is not None:
        x = jpeg(x, p["jpeg_quality"])
    return x


def degrade_latent(z: torch.Tensor, p: dict, gen: torch.Generator) -> torch.Tensor:
    """Latent blur then noise on (B, C, F, h, w), with the clip's drawn strengths."""
    b = z.shape[0]
    z = gaussian_blur(z, torch.full((b,), p["latent_blur"], dtype=z.dtype, device=z.device))
    return z + p["latent_noise"] * torch.randn(z.shape, generator=gen).to(z)
