"""The Refiner's training objective: bridge flow matching from the upsampled preview to the target
(docs/method.md, "Refiner"); its sampler is surf_train.models.sampler.

x_up = up(preview); x_start = x_up + sigma_aug * eps; x_t = (1 - t) * x_hr + t * x_start;
target velocity v = x_start - x_hr; exact previews' error on the preview grid weighed up by exact_low_weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from surf_train.base.sampling import UpMode, resize_latent
from surf_train.common.config import check
from surf_train.common.errors import ConfigError
from surf_train.data.degrade import gaussian_blur
from surf_train.models.refiner import PREVIEW_KINDS, as_velocity
from surf_train.models.sampler import NoiseSpace, RefinerFn, RefinerSampler, start_noise, upsample


@dataclass
class BridgeConfig:
    """How training pairs become bridge-flow samples, and how the sampler runs."""

    # the first nine fields in the order exports have recorded them (surf.json "bridge")
    t_dist: Literal["logit_normal", "uniform"] = "logit_normal"
    sigma_aug_max: float = 0.5  # per-sample noise on the start point ~ U(0, sigma_aug_max): regularises (0.1 overfits)
    sigma_aug_eval: float = 0.0  # start-point noise used by the sampler (0: the clean upsampled preview)
    noise_space: NoiseSpace = "full"  # start-point noise; detail: nothing on the preview grid (start_noise)
    up_mode: UpMode = "bilinear"  # preview -> target grid (per frame; frames never change)
    latent_noise_max: float = 0.0  # latent degradation: extra Gaussian noise ~ U(0, max) on x_up
    latent_blur_max: float = 0.0  # latent degradation: Gaussian blur sigma ~ U(0, max) pixels, per sample
    steps: int = 10  # K: Euler steps of the sampler (validation and generation)
    consistency: bool = False  # sampler: keep every step's target estimate on the preview (refine, match_preview)
    t_mean: float = 0.0  # logit-normal location
    t_std: float = 1.0  # logit-normal scale
    degrade_prob: float = 0.5  # probability that a sample gets the latent degradations
    exact_low_weight: float = 0.0  # extra loss weight on exact previews' low band (bridge_loss; docs/method.md)

    def __post_init__(self):
        check(self, "bridge.")
        if self.steps < 1:
            raise ConfigError(f"bridge.steps={self.steps} must be >= 1")
        if self.exact_low_weight < 0:
            raise ConfigError(f"bridge.exact_low_weight={self.exact_low_weight} must be >= 0")

    def sampler(self) -> RefinerSampler:
        """The sampler these settings describe (validation's; an export stores them for generation)."""
        return RefinerSampler.from_bridge(dataclasses.asdict(self))


def sample_t(
    n: int, cfg: BridgeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(n,) bridge times in (0, 1)."""
    if cfg.t_dist == "uniform":
        return torch.rand(n, generator=generator).to(device)
    return torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(n, generator=generator)).to(device)


def augment_cond(x: torch.Tensor, cfg: BridgeConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latent-level degradations of the upsampled preview (blur, noise), per sample, under a seed."""
    b = x.shape[0]
    if cfg.latent_blur_max <= 0 and cfg.latent_noise_max <= 0:
        return x
    on = (torch.rand(b, generator=generator) < cfg.degrade_prob).float()  # (B,)
    blur = on * cfg.latent_blur_max * torch.rand(b, generator=generator)
    noise = on * cfg.latent_noise_max * torch.rand(b, generator=generator)
    eps = torch.randn(x.shape, generator=generator).to(x)
    x = gaussian_blur(x, blur.to(x.device))
    return x + noise.to(x).view(b, 1, 1, 1, 1) * eps


@dataclass
class BridgeBatch:
    x_t: torch.Tensor  # (B, C, F, H, W)
    t: torch.Tensor  # (B,)
    cond: torch.Tensor  # (B, C, F, H, W) the (degraded) upsampled preview
    v: torch.Tensor  # (B, C, F, H, W) target velocity


def bridge_batch(
    preview: torch.Tensor, target: torch.Tensor, cfg: BridgeConfig, generator: torch.Generator | None = None
) -> BridgeBatch:
    """Training inputs and target for one batch of pairs."""
    b, dev = target.shape[0], target.device
    x_up = augment_cond(upsample(preview, tuple(target.shape[-2:]), cfg.up_mode), cfg, generator)
    sig = cfg.sigma_aug_max * torch.rand(b, generator=generator).to(target).view(b, 1, 1, 1, 1)
    x_start = x_up + sig * start_noise(target.shape, preview.shape[-2:], cfg.noise_space, generator).to(target)
    t = sample_t(b, cfg, generator, dev).to(target.dtype)
    tt = t.view(b, 1, 1, 1, 1)
    return BridgeBatch(x_t=(1 - tt) * target + tt * x_start, t=t, cond=x_up, v=x_start - target)


def bridge_loss(
    net: RefinerFn,
    preview: torch.Tensor,
    target: torch.Tensor,
    cfg: BridgeConfig,
    text: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    kind: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the predicted and the bridge velocity, plus cfg.exact_low_weight x the mean square of the exact
    previews' velocity error area-pooled to the preview grid (kind: (B,) PREVIEW_KINDS indices): what that error
    moves is the low band the preview fixes, and the plain MSE gives it 1 / r^2 of its weight."""
    bb = bridge_batch(preview, target, cfg, generator)
    err = as_velocity(net(bb.x_t, bb.t, bb.cond, text)).float() - bb.v.float()
    loss = err.square().mean()
    if cfg.exact_low_weight and kind is not None:
        exact = (kind == PREVIEW_KINDS.index("exact")).to(err)  # (B,)
        low = resize_latent(err, tuple(preview.shape[-2:]), "area").square().mean(dim=(1, 2, 3, 4))  # (B,)
        loss = loss + cfg.exact_low_weight * (exact * low).mean()
    return loss
