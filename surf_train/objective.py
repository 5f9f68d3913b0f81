"""Bridge flow matching from the upsampled preview to the target (DESIGN 3.3), and its K-step sampler.

x_up = up(preview); x_start = x_up + sigma_aug * eps; x_t = (1 - t) * x_hr + t * x_start;
target velocity v = x_start - x_hr. Sampling integrates from t = 1 (x_start) to t = 0, with `consistency` keeping
each step's target estimate on the latents whose area pooling to the preview grid is the preview.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from surf_train.errors import ConfigError
from surf_train.sampling import euler_sample, resize_latent

# net(x_t (B,C,F,H,W), t (B,), cond (B,C,F,H,W), text (B,L,D) | None) -> v (B,C,F,H,W)
RefinerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


NOISE_SPACES = ("full", "detail")


@dataclass
class BridgeConfig:
    """How training pairs become bridge-flow samples, and how the sampler runs."""

    t_dist: str = "logit_normal"  # logit_normal | uniform
    t_mean: float = 0.0  # logit-normal location
    t_std: float = 1.0  # logit-normal scale
    sigma_aug_max: float = 0.5  # per-sample noise on the start point ~ U(0, sigma_aug_max)
    noise_space: str = "full"  # start-point noise: full | detail (nothing on the preview grid: start_noise)
    sigma_aug_eval: float = 0.0  # start-point noise used by the sampler
    up_mode: str = "bilinear"  # preview -> target grid (per frame; frames never change)
    latent_noise_max: float = 0.0  # latent degradation: extra Gaussian noise ~ U(0, max) on x_up
    latent_blur_max: float = 0.0  # latent degradation: Gaussian blur sigma ~ U(0, max) pixels, per sample
    degrade_prob: float = 0.5  # probability that a sample gets the latent degradations
    steps: int = 10  # K: Euler steps of the sampler
    consistency: bool = False  # sampler: keep every step's target estimate on the preview (refine, match_preview)

    def __post_init__(self):
        if self.t_dist not in ("logit_normal", "uniform"):
            raise ValueError(f"t_dist={self.t_dist!r}: choose logit_normal or uniform")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.noise_space not in NOISE_SPACES:
            raise ValueError(f"noise_space={self.noise_space!r}: choose from {list(NOISE_SPACES)}")


def upsample(preview: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Preview latent (B, C, F, h, w) -> target grid (B, C, F, H, W)."""
    return resize_latent(preview, size, mode)


def sample_t(
    n: int, cfg: BridgeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(n,) bridge times in (0, 1)."""
    if cfg.t_dist == "uniform":
        return torch.rand(n, generator=generator).to(device)
    return torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(n, generator=generator)).to(device)


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
) -> torch.Tensor:
    """MSE between the predicted and the bridge velocity."""
    bb = bridge_batch(preview, target, cfg, generator)
    return F.mse_loss(net(bb.x_t, bb.t, bb.cond, text).float(), bb.v.float())


def sampler_settings(bridge: dict, start_noise: float | None = None, consistency: bool | None = None) -> dict:
    """refine()'s keyword arguments for an exported Refiner (its surf.json `bridge`): start-point noise, its space
    and consistency; `start_noise` and `consistency` replace the stored ones where given."""
    return {
        "sigma_aug": float(bridge.get("sigma_aug_eval", 0.0)) if start_noise is None else float(start_noise),
        "noise_space": bridge.get("noise_space", "full"),
        "consistency": bool(bridge.get("consistency", False)) if consistency is None else consistency,
    }


def start_noise(
    shape: tuple[int, ...], preview_hw: tuple[int, int], space: str = "full", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Unit Gaussian noise of `shape` (B, C, F, H, W); `detail`: minus its area pooling to the preview grid
    (nearest-repeated), so the noise has no component there and x_up + noise pools to the same preview."""
    eps = torch.randn(shape, generator=generator)
    if space == "full":
        return eps
    if space != "detail":
        raise ConfigError(f"noise_space {space!r}: choose from {list(NOISE_SPACES)}")
    return match_preview(eps, torch.zeros(*shape[:3], *preview_hw))


def match_preview(x: torch.Tensor, preview: torch.Tensor) -> torch.Tensor:
    """The latent nearest to x (B, C, F, H, W) whose r x r area pooling is `preview` (B, C, F, H/r, W/r).

    The orthogonal projection x + A+(preview - A x) onto {A x = preview}, A the area pooling: its pseudo-inverse A+
    repeats each preview pixel r x r. The refined latent keeps its detail and takes the preview's low band exactly.
    """
    (hh, ww), (h, w) = x.shape[-2:], preview.shape[-2:]
    if hh % h or ww % w:
        raise ConfigError(
            f"consistency: the refined latent grid {hh}x{ww} is not an integer multiple of the preview's {h}x{w}"
        )
    return x + resize_latent(preview.to(x) - resize_latent(x, (h, w), "area"), (hh, ww), "nearest")


@torch.no_grad()
def refine(
    net: RefinerFn,
    x_up: torch.Tensor,
    steps: int = 10,
    sigma_aug: float = 0.0,
    text: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    preview: torch.Tensor | None = None,
    noise_space: str = "full",
    consistency: bool = False,
) -> torch.Tensor:
    """K-step Euler from t = 1 (x_start = x_up + sigma_aug * eps) to t = 0; x_up (B, C, F, H, W) upsampled from
    `preview`, which `noise_space="detail"` (eps: start_noise) and `consistency` need. With `consistency` every
    step's estimate of the target, x - t * v, is projected onto the preview (match_preview) before the step
    (range-null-space sampling, as DDNM does): the result is exactly consistent, and the network smooths the
    projection's block edges in the steps after (projecting only the result left them, measured)."""
    if preview is None and (consistency or (noise_space != "full" and sigma_aug > 0)):
        raise ValueError(f"refine: noise_space={noise_space!r} and consistency={consistency} need the preview")
    hw = x_up.shape[-2:] if preview is None else preview.shape[-2:]
    eps = start_noise(x_up.shape, hw, noise_space, generator).to(x_up) if sigma_aug > 0 else 0
    x = x_up + sigma_aug * eps
    b = x_up.shape[0]

    def velocity(x, s):
        return net(x, torch.full((b,), s, device=x.device, dtype=x.dtype), x_up, text)

    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if not consistency:
        return euler_sample(velocity, x, ts)
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        v = velocity(x, t)
        x_hr = match_preview(x - t * v, preview)  # the target estimate, on the preview; without it this is Euler
        x = (1 - t_next) * x_hr + t_next * (x + (1 - t) * v)  # back on the bridge through the same start point
    return x
