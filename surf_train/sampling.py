"""Flow-matching schedules, Euler sampling and noise reshifting (DESIGN 3.1, 3.2).

Convention: x_s = (1 - s) * x0 + s * eps, the network predicts v = eps - x0, so x0 = x_s - s * v.
Latents are (B, C, F, H, W); resampling touches H and W only, never the frame count.
Every sampler takes the network as a callable `velocity(x, s) -> v` with `s` a python float.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
Rule = Literal["paper", "snr", "pool"]
RULES = ("paper", "snr", "pool")
DOWN_MODES = ("area", "bilinear", "bicubic")
UP_MODES = ("nearest", "bilinear", "bicubic")


def shift_sigma(s: torch.Tensor | float, a: float) -> torch.Tensor | float:
    """Resolution-dependent timestep shift: a*s / (1 + (a-1)*s)."""
    return a * s / (1 + (a - 1) * s)


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Noise levels for `steps` Euler steps: steps+1 values from 1 down to 0, shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def euler_sample(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler integration of dx/ds = v along `sigmas` (decreasing)."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s) * velocity(x, s)
    return x


# --- resampling in latent space ---------------------------------------------------------------

def _per_frame(x: torch.Tensor, fn) -> torch.Tensor:
    b, c, f, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * f, c, h, w))  # (B*F, C, h', w')
    return y.reshape(b, f, c, *y.shape[-2:]).transpose(1, 2)


def resize_latent(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, F, H, W) to (B, C, F, *size) frame by frame with a separable linear kernel."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode not in DOWN_MODES + UP_MODES:
        raise ValueError(f"unknown resampling mode {mode!r}; choose from {sorted(set(DOWN_MODES + UP_MODES))}")
    kw = {} if mode in ("area", "nearest") else {"align_corners": False, "antialias": True}
    return _per_frame(x, lambda y: F.interpolate(y.float(), size=tuple(size), mode=mode, **kw).to(x.dtype))


def noise_gain(in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str) -> float:
    """Std of resize_latent(eps) for unit iid noise eps, averaged over output pixels.

    The kernels are separable, D = Mh (x) Mw, so each output pixel's gain is ||row of Mh|| * ||row of Mw||.
    A column of Mh is D applied to an image that is one on input row i and constant along W (rows of Mw sum to 1).
    For `area` with an integer factor r this is exactly 1/r per axis.
    """
    (h, w), (oh, ow) = in_hw, out_hw
    rows = torch.eye(h, dtype=torch.float64)[:, None, :, None].expand(h, 1, h, w)  # (h, 1, h, w)
    cols = torch.eye(w, dtype=torch.float64)[:, None, None, :].expand(w, 1, h, w)
    kw = {} if mode in ("area", "nearest") else {"align_corners": False, "antialias": True}
    mh = F.interpolate(rows, size=(oh, ow), mode=mode, **kw)[:, 0, :, 0]  # (h, oh): Mh transposed
    mw = F.interpolate(cols, size=(oh, ow), mode=mode, **kw)[:, 0, 0, :]  # (w, ow)
    gain2 = (mh**2).sum(0)[:, None] * (mw**2).sum(0)[None, :]  # (oh, ow)
    return float(gain2.mean().sqrt())


# --- noise reshifting ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Reshift:
    """Result of a switch to low resolution: the new latent and its noise level."""
    x: torch.Tensor  # (B, C, F, h, w)
    sigma: float  # noise level the low-resolution run continues from
    gain: float  # noise gain of the downsampling kernel


def reshift(x: torch.Tensor, v: torch.Tensor | None, s: float, size: tuple[int, int], rule: Rule,
            noise: torch.Tensor | None = None, down: str = "area") -> Reshift:
    """Switch a latent at noise level `s` from (H, W) to `size` with one of the DESIGN 3.2 rules.

    x: (B, C, F, H, W) noisy latent; v: velocity at (x, s) (unused by `pool`);
    noise: fresh unit noise of the low-resolution shape (unused by `pool`).
    """
    g = noise_gain(tuple(x.shape[-2:]), tuple(size), down)
    if rule == "pool":
        # down(x) = (1-s) x0_lr + (s g) eps'  ->  divide by c so the coefficients sum to 1 again
        c = (1 - s) + s * g
        return Reshift(resize_latent(x, size, down) / c, s * g / c, g)
    if rule not in ("paper", "snr"):
        raise ValueError(f"unknown re-noise rule {rule!r}; choose from {RULES}")
    x0 = x if s == 0 else x - s * v  # (B, C, F, H, W)
    x0_lr = resize_latent(x0, size, down)
    s_new = s if rule == "paper" else float(shift_sigma(s, g))
    if noise is None or noise.shape != x0_lr.shape:
        raise ValueError(f"rule {rule!r} needs fresh noise of shape {tuple(x0_lr.shape)}")
    return Reshift((1 - s_new) * x0_lr + s_new * noise, s_new, g)


def low_res_sigmas(sigmas: torch.Tensor, k: int, rule: Rule, gain: float) -> torch.Tensor:
    """Schedule for the steps after the switch at index k.

    `paper` keeps the native levels; `snr` and `pool` map every remaining level through shift(., gain),
    the level with the same signal-to-noise ratio after downsampling, so the run starts exactly where
    the reshift put it and keeps the schedule's shape.
    """
    rest = sigmas[k:]
    return rest if rule == "paper" else shift_sigma(rest, gain)


@dataclass
class PreviewPlan:
    """Settings of one noise-reshifting run."""
    steps: int
    switch: int  # k: steps run before the switch
    shift: float
    preview_size: tuple[int, int]  # latent (h, w) of the preview
    rule: Rule = "pool"
    down: str = "area"

    def __post_init__(self):
        if not 0 <= self.switch <= self.steps:
            raise ValueError(f"switch step must be in [0, steps={self.steps}], got {self.switch}")
        if self.rule not in RULES:
            raise ValueError(f"unknown re-noise rule {self.rule!r}; choose from {RULES}")
        if self.down not in DOWN_MODES:
            raise ValueError(f"unknown downsampling kernel {self.down!r}; choose from {DOWN_MODES}")

    @property
    def sigmas(self) -> torch.Tensor:
        return flow_sigmas(self.steps, self.shift)


def _switch(velocity: Velocity, x: torch.Tensor, plan: PreviewPlan, fresh_noise: torch.Tensor | None):
    """Returns (v at the switch or None, Reshift)."""
    s_k = float(plan.sigmas[plan.switch])
    v = velocity(x, s_k) if plan.rule != "pool" and s_k > 0 else None
    return v, reshift(x, v, s_k, plan.preview_size, plan.rule, fresh_noise, plan.down)


def preview_sample(velocity: Velocity, noise: torch.Tensor, plan: PreviewPlan,
                   fresh_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Noise-reshifting preview: `switch` steps at the noise's resolution, the rest at preview size.

    noise: (B, C, F, H, W) start noise at the prefix resolution; fresh_noise: (B, C, F, h, w) for
    `paper`/`snr`. Returns the clean preview latent (B, C, F, h, w).
    """
    x = euler_sample(velocity, noise, plan.sigmas[: plan.switch + 1])
    return finish_preview(velocity, x, plan, fresh_noise)


def finish_preview(velocity: Velocity, x: torch.Tensor, plan: PreviewPlan,
                   fresh_noise: torch.Tensor | None = None) -> torch.Tensor:
    """The switch and the remaining steps at preview size, from x (B, C, F, H, W) at level sigmas[switch].

    Re-previews of real clips start here: the clean target latent noised to sigmas[switch].
    """
    _, r = _switch(velocity, x, plan, fresh_noise)
    return euler_sample(velocity, r.x, low_res_sigmas(plan.sigmas, plan.switch, plan.rule, r.gain))


def pair_sample(velocity: Velocity, noise: torch.Tensor, plan: PreviewPlan,
                fresh_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(preview, target) sharing the first `switch` steps at the target resolution.

    Branch A continues to the end at full size (the target); branch B reshifts and finishes at
    preview size. The velocity at the switch is computed once and used by both branches.
    """
    sig = plan.sigmas
    x = euler_sample(velocity, noise, sig[: plan.switch + 1])
    v, r = _switch(velocity, x, plan, fresh_noise)
    preview = euler_sample(velocity, r.x, low_res_sigmas(sig, plan.switch, plan.rule, r.gain))
    if plan.switch == plan.steps:
        return preview, x
    if v is None:
        v = velocity(x, float(sig[plan.switch]))
    x = x + float(sig[plan.switch + 1] - sig[plan.switch]) * v  # branch A's first step reuses v
    target = euler_sample(velocity, x, sig[plan.switch + 1:])
    return preview, target


def count_calls(plan: PreviewPlan) -> dict[str, int]:
    """Network evaluations at each resolution for a shared-prefix pair and for separate runs."""
    n, k = plan.steps, plan.switch
    extra = int(plan.rule != "pool" and k < n)  # paper/snr evaluate v once more at the switch
    return {"shared_high": n, "shared_low": n - k, "separate_high": n + k + extra, "separate_low": n - k}
