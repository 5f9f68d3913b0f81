"""The Refiner's sampler: upsample the preview, then K Euler steps of the bridge flow from t = 1 to t = 0
(docs/method.md, "Refiner"). One typed object whose settings are read once from an export; the pipeline, validation,
the evaluations and the benchmarks all run it.

x_up = up(preview); x_start = x_up + start_noise * eps; the network's velocity v carries x_start to the target.
With `consistency` each step's target estimate is kept on the latents whose area pooling is the preview.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from surf_train.base.sampling import UP_MODES, AfterStep, UpMode, euler_sample, randn, resize_latent
from surf_train.common.errors import ConfigError
from surf_train.models.refiner import PREVIEW_KINDS, as_velocity

# net(x_t (B,C,F,H,W), t (B,), cond (B,C,F,H,W), text (B,L,D) | None) -> v (B,C,F,H,W)
RefinerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

NoiseSpace = Literal["full", "detail"]
NOISE_SPACES = get_args(NoiseSpace)


def upsample(preview: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Preview latent (B, C, F, h, w) -> target grid (B, C, F, H, W); frames never change."""
    return resize_latent(preview, tuple(size), mode)


def start_noise(
    shape: tuple[int, ...], preview_hw: tuple[int, int], space: str = "full", generator=None
) -> torch.Tensor:
    """Unit Gaussian noise of `shape` (B, C, F, H, W); `detail`: minus its area pooling to the preview grid
    (nearest-repeated), so the noise has no component there and x_up + noise pools to the same preview.
    generator: one, or a list of B (sample i drawn with generator i, sampling.randn)."""
    eps = randn(shape, generator).cpu()
    if space == "full":
        return eps
    if space != "detail":
        raise ConfigError(f"noise_space {space!r}: choose from {list(NOISE_SPACES)}")
    return match_preview(eps, torch.zeros(*shape[:3], *preview_hw))


def takes_kind(net) -> bool:
    """Whether `net` is a Refiner told the preview's kind (kind_condition); plain velocity functions are not."""
    config = getattr(net, "config", None)
    return bool(config.get("kind_condition", False)) if hasattr(config, "get") else False


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


@dataclass(frozen=True)
class RefinerSampler:
    """How a Refiner turns a preview into a target latent. Defaults: an export that records none of them."""

    steps: int = 10  # K: Euler steps
    up_mode: UpMode = "bilinear"  # preview -> target grid
    start_noise: float = 0.0  # sigma of the start-point noise (training's sigma_aug_eval)
    noise_space: NoiseSpace = "full"  # detail: no noise component on the preview grid (start_noise())
    consistency: bool = False  # keep every step's target estimate on the preview (match_preview)
    preview_kind: str | None = None  # what the preview is (PREVIEW_KINDS), told to a Refiner with kind_condition

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"refiner steps {self.steps}: the Refiner needs at least 1 step")
        if self.up_mode not in UP_MODES:
            raise ConfigError(f"up_mode {self.up_mode!r}: choose from {list(UP_MODES)}")
        if self.noise_space not in NOISE_SPACES:
            raise ConfigError(f"noise_space {self.noise_space!r}: choose from {list(NOISE_SPACES)}")
        if self.start_noise < 0:
            raise ConfigError(f"start_noise {self.start_noise} must be >= 0")
        if self.preview_kind is not None and self.preview_kind not in PREVIEW_KINDS:
            raise ConfigError(f"preview_kind {self.preview_kind!r}: choose from {list(PREVIEW_KINDS)}")

    @classmethod
    def from_bridge(cls, bridge: dict) -> RefinerSampler:
        """The sampler an export's `bridge` record (surf.json; the run's bridge settings) describes."""
        d = cls()
        return cls(
            steps=int(bridge.get("steps", d.steps)),
            up_mode=bridge.get("up_mode", d.up_mode),
            start_noise=float(bridge.get("sigma_aug_eval", d.start_noise)),
            noise_space=bridge.get("noise_space", d.noise_space),
            consistency=bool(bridge.get("consistency", d.consistency)),
        )

    def bridge_record(self) -> dict:
        """The `bridge` keys from_bridge reads (what an export stores for this sampler)."""
        return {
            "steps": self.steps,
            "up_mode": self.up_mode,
            "sigma_aug_eval": self.start_noise,
            "noise_space": self.noise_space,
            "consistency": self.consistency,
        }

    def override(self, **given) -> RefinerSampler:
        """This sampler with the settings given as not None replaced (a caller's or a command line's)."""
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    def upsample(self, preview: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return upsample(preview, size, self.up_mode)

    @torch.no_grad()
    def refine(
        self,
        net: RefinerFn,
        x_up: torch.Tensor,
        preview: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        after: AfterStep | None = None,
    ) -> torch.Tensor:
        """K-step Euler from t = 1 (x_start = x_up + start_noise * eps) to t = 0; x_up (B, C, F, H, W) upsampled
        from `preview`, which detail noise and `consistency` need. With `consistency` every step's estimate of the
        target, x - t * v, is projected onto the preview (match_preview) before the step (range-null-space
        sampling, as DDNM does): the result is exactly consistent, and the network smooths the projection's block
        edges in the steps after (projecting only the result left them, measured). after: see sampling.AfterStep
        (t = 1000 x the bridge time of the step's start)."""
        return self.integrate(net, self.start(x_up, preview, generator), x_up, preview, text, after)

    def start(
        self,
        x_up: torch.Tensor,
        preview: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """refine's start point x_start = x_up + start_noise * eps (B, C, F, H, W), eps drawn by start_noise()."""
        noisy = self.start_noise > 0
        if preview is None and (self.consistency or (self.noise_space != "full" and noisy)):
            raise ConfigError(f"refine: noise_space {self.noise_space!r} and consistency need the preview")
        hw = x_up.shape[-2:] if preview is None else preview.shape[-2:]
        eps = start_noise(x_up.shape, hw, self.noise_space, generator).to(x_up) if noisy else 0
        return x_up + self.start_noise * eps

    def integrate(
        self,
        net: RefinerFn,
        x: torch.Tensor,
        x_up: torch.Tensor,
        preview: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        after: AfterStep | None = None,
    ) -> torch.Tensor:
        """refine's K steps from the start point x (B, C, F, H, W), with autograd as the caller has it on: a
        distilled student trains through them (surf_train.training.distill)."""
        if preview is None and self.consistency:
            raise ConfigError("refine: consistency needs the preview")
        b = x_up.shape[0]
        kind = {"preview_kind": self.preview_kind} if self.preview_kind and takes_kind(net) else {}

        def velocity(x, s):
            return as_velocity(net(x, torch.full((b,), s, device=x.device, dtype=x.dtype), x_up, text, **kind))

        ts = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        if not self.consistency:
            return euler_sample(velocity, x, ts, after)
        for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
            v = velocity(x, t)
            x_hr = match_preview(x - t * v, preview)  # the target estimate, on the preview; without it this is Euler
            x = (1 - t_next) * x_hr + t_next * (x + (1 - t) * v)  # back on the bridge through the same start point
            if after is not None:
                x = after(torch.tensor(t * 1000.0), x)
        return x

    def __call__(
        self,
        net: RefinerFn,
        preview: torch.Tensor,
        size: tuple[int, int],
        text: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Preview (B, C, F, h, w) -> refined latent (B, C, F, *size): upsample, then refine."""
        return self.refine(net, self.upsample(preview, size), preview, text, generator)
