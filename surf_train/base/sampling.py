"""Flow-matching sampling with the base model's own diffusers scheduler, and noise reshifting (docs/method.md).

Convention: x_s = (1 - s) * x0 + s * eps, the network predicts v = eps - x0, so x0 = x_s - s * v.
Latents are (B, C, F, H, W); resampling touches H and W only, never the frame count.
The base-model samplers take the network as a callable `velocity(x, step) -> v` (`step`: a `Step`, what the
pipeline tells the transformer and its cache hooks) and the scheduler as a `Schedule` (the pipeline's own
scheduler and the `set_timesteps` call that pipeline makes), both as parameters, so an oracle velocity and any
flow-matching scheduler test them. `euler_sample` is the plain Euler loop the Refiner's bridge uses
(docs/method.md#refiner-objective).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from surf_train.common.errors import ConfigError

Rule = Literal["paper", "snr", "pool"]  # re-noise rule at the switch (docs/method.md)
DownMode = Literal["area", "bilinear", "bicubic"]
UpMode = Literal["nearest", "bilinear", "bicubic"]
RULES, DOWN_MODES, UP_MODES = get_args(Rule), get_args(DownMode), get_args(UpMode)
# supported scheduler classes -> the config key of their timestep shift
SCHEDULERS = {
    "FlowMatchEulerDiscreteScheduler": "shift",
    "UniPCMultistepScheduler": "flow_shift",
    "DPMSolverMultistepScheduler": "flow_shift",
}
# config overrides that make set_timesteps(sigmas=...) use the given sigmas as they are (they are final levels)
_AS_GIVEN = {
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def shift_sigma(s: torch.Tensor | float, a: float) -> torch.Tensor | float:
    """Resolution-dependent timestep shift: a*s / (1 + (a-1)*s)."""
    return a * s / (1 + (a - 1) * s)


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps+1 levels from 1 down to 0 on linspace(1, 0), shifted (the Refiner's grid; not a base scheduler's)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


# after(t, x) -> x: called after each sampler step with its timestep and the new latent, which it may replace
# (the pipeline's callback_on_step_end); None: nothing
AfterStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def randn(shape: tuple[int, ...], generator=None) -> torch.Tensor:
    """Unit Gaussian noise drawn on the generator's device (the CPU without one). A list of generators draws sample
    i (dim 0) with generator i, as diffusers' randn_tensor does, so sample i equals a batch of one drawn with it."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, device=None if generator is None else generator.device)
    if len(generator) != shape[0]:
        raise ConfigError(f"generator: a list of {len(generator)} generators for a batch of {shape[0]}")
    return torch.cat([randn((1, *shape[1:]), g).cpu() for g in generator])


def euler_sample(
    velocity: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    after: AfterStep | None = None,
) -> torch.Tensor:
    """Euler integration of dx/ds = v(x, s) along `sigmas` (decreasing); after: see AfterStep (t = s * 1000)."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s) * velocity(x, s)
        if after is not None:
            x = after(torch.tensor(s * 1000.0), x)
    return x


# --- schedulers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One network call's place in a run: what the pipeline passes the transformer and its cache hooks."""

    sigma: float  # noise level s of x (scheduler.sigmas[i])
    timestep: torch.Tensor  # 0-d scheduler.timesteps[i], as the pipeline passes it (sigma * 1000; int64 for UniPC)
    index: int  # step of the base model's schedule, 0..steps-1; the low-resolution steps continue from the switch
    steps: int  # steps of that schedule
    stage: str = "native"  # "native": the noise's own size (prefix, baseline, target); "low": after the switch
    start: bool = False  # first call of a sampler run: state kept across calls (caches) starts afresh here


Velocity = Callable[[torch.Tensor, Step], torch.Tensor]


def check_scheduler(scheduler: Any) -> None:
    """ConfigError unless `scheduler` is a deterministic flow-matching scheduler these samplers can step."""
    name = type(scheduler).__name__
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler {name} is not supported; supported: {sorted(SCHEDULERS)}")
    c = scheduler.config
    bad = []
    if name != "FlowMatchEulerDiscreteScheduler" and not (
        c.get("use_flow_sigmas") and c.get("prediction_type") == "flow_prediction"
    ):
        bad.append("use_flow_sigmas=True and prediction_type='flow_prediction' (flow matching)")
    if c.get("use_dynamic_shifting"):
        bad.append("use_dynamic_shifting=False (no mu is passed)")
    if c.get("invert_sigmas") or c.get("stochastic_sampling") or "sde" in str(c.get("algorithm_type", "")):
        bad.append("a deterministic, non-inverted schedule (no stochastic_sampling, invert_sigmas or sde-*)")
    if c.get("final_sigmas_type", "zero") != "zero" or c.get("solver_p") is not None:
        bad.append("final_sigmas_type='zero' and no solver_p")
    if bad:
        raise ConfigError(f"{name} config needs " + "; ".join(bad))


def scheduler_shift(scheduler: Any) -> float:
    """The timestep shift in a supported scheduler's config (`shift` or `flow_shift`)."""
    check_scheduler(scheduler)
    return float(scheduler.config[SCHEDULERS[type(scheduler).__name__]])


def with_shift(scheduler: Any, shift: float | None) -> Any:
    """A new scheduler of the same class and config with another timestep shift (None: unchanged)."""
    check_scheduler(scheduler)
    if shift is None or shift == scheduler_shift(scheduler):
        return scheduler
    if shift <= 0:
        raise ConfigError(f"shift={shift} must be > 0")
    return type(scheduler).from_config(scheduler.config, **{SCHEDULERS[type(scheduler).__name__]: float(shift)})


@dataclass(frozen=True)
class Schedule:
    """A base model's schedule: its pipeline's scheduler and the set_timesteps call that pipeline makes.

    `scheduler` is a template, never stepped itself: every run steps a fresh instance from its config, so no
    multistep history or step index leaks between runs.
    """

    scheduler: Any  # FlowMatchEulerDiscreteScheduler, or UniPC / DPM-Solver++ configured for flow matching
    steps: int
    custom_sigmas: bool = False  # HunyuanVideoPipeline: set_timesteps(sigmas=linspace(1, 0, N + 1)[:-1]); Wan: (N)

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be an integer >= 1")
        check_scheduler(self.scheduler)
        if self.custom_sigmas and not _takes_sigmas(self.scheduler):
            raise ConfigError(
                f"{type(self.scheduler).__name__}.set_timesteps takes no custom sigmas, which this "
                f"pipeline passes (HunyuanVideoPipeline refuses it too)"
            )

    def start(self, device: torch.device | str | None = None) -> Any:
        """A fresh scheduler, set up exactly as the pipeline sets its own before the denoising loop."""
        s = type(self.scheduler).from_config(self.scheduler.config)
        if self.custom_sigmas:
            s.set_timesteps(sigmas=np.linspace(1.0, 0.0, self.steps + 1)[:-1], device=device)
        else:
            s.set_timesteps(self.steps, device=device)
        s.set_begin_index(0)
        return s

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """The steps+1 noise levels the scheduler visits, ending at 0 (float64)."""
        return self.start().sigmas.double().cpu()

    @property
    def shift(self) -> float:
        return scheduler_shift(self.scheduler)


# how a FlowMatchEuler config becomes another supported class (the settings diffusers' Wan docs give for UniPC)
_FLOW = {
    "UniPCMultistepScheduler": {"prediction_type": "flow_prediction", "use_flow_sigmas": True},
    "DPMSolverMultistepScheduler": {
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
    },
}


def convert_scheduler(scheduler: Any, name: str | None) -> Any:
    """The scheduler as another supported class with the same shift (None or its own class: unchanged)."""
    check_scheduler(scheduler)
    if name is None or name == type(scheduler).__name__:
        return scheduler
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler {name!r} is not supported; supported: {sorted(SCHEDULERS)}")
    import diffusers

    cls = getattr(diffusers, name)
    own = SCHEDULERS[type(scheduler).__name__]  # the old class's shift key, unknown to the new one
    config = {k: v for k, v in scheduler.config.items() if k != own}
    out = cls.from_config(config, **_FLOW.get(name, {}), **{SCHEDULERS[name]: scheduler_shift(scheduler)})
    check_scheduler(out)
    return out


def euler_schedule(steps: int, shift: float = 1.0) -> Schedule:
    """diffusers' FlowMatchEulerDiscreteScheduler(shift) set up as WanPipeline does (tests, defaults)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return Schedule(FlowMatchEulerDiscreteScheduler(shift=shift), steps)


def _takes_sigmas(scheduler: Any) -> bool:
    return "sigmas" in inspect.signature(scheduler.set_timesteps).parameters


def scheduler_on(template: Any, levels: torch.Tensor, device: torch.device | str | None = None) -> Any:
    """A fresh scheduler of the template's class and solver settings whose steps visit exactly `levels`.

    levels: (n+1,) decreasing noise levels ending at 0. Where set_timesteps takes custom sigmas (FlowMatchEuler,
    UniPC) they go through it with the config's own shift and sigma transforms turned off (the levels are final);
    DPMSolverMultistepScheduler takes none, so its n-step grid is replaced by `levels` after set_timesteps (its
    step reads nothing else per step: alpha_t = 1 - sigma_t for flow sigmas).
    """
    name = type(template).__name__
    key = SCHEDULERS[name]
    lv = levels.double().cpu().numpy()
    if lv[-1] != 0 or len(lv) < 2:
        raise ValueError(f"levels must be at least two values ending at 0, got {lv.tolist()}")
    if _takes_sigmas(template):
        s = type(template).from_config(
            template.config, **{key: 1.0}, **{k: v for k, v in _AS_GIVEN.items() if k in template.config}
        )
        s.set_timesteps(sigmas=lv[:-1].copy(), device=device)
    else:
        s = type(template).from_config(template.config)
        s.set_timesteps(len(lv) - 1, device=device)
        s.sigmas = torch.from_numpy(lv.astype(np.float32)).to(s.sigmas.device)
        s.timesteps = torch.from_numpy(lv[:-1] * s.config.num_train_timesteps).to(s.timesteps)
    s.set_begin_index(0)
    # UniPC nudges a first level of 1 down by 1e-6 (log(0) otherwise); anything more is a config we mishandled
    if s.sigmas.shape != levels.shape or not torch.allclose(s.sigmas.double().cpu(), levels.double().cpu(), atol=2e-6):
        raise RuntimeError(f"{name} did not take the levels {lv.tolist()}: got {s.sigmas.tolist()}")
    return s


def scheduler_steps(
    velocity: Velocity,
    x: torch.Tensor,
    sched: Any,
    n: int,
    steps: int,
    stage: str = "native",
    offset: int = 0,
    v: torch.Tensor | None = None,
    start: bool = False,
    after: AfterStep | None = None,
) -> torch.Tensor:
    """`n` steps of a started scheduler from where it stands, as the pipeline's loop makes them.

    steps/offset: the schedule's length and the index of the scheduler's step 0 in it (for `Step`);
    v: the velocity at (x, current level) when already computed (the shared switch call); after: see AfterStep.
    """
    for _ in range(n):
        i = sched.step_index if sched.step_index is not None else sched.begin_index
        t = sched.timesteps[i]
        if v is None:
            v = velocity(x, Step(float(sched.sigmas[i]), t, offset + i, steps, stage, start))
        x = sched.step(v, t, x, return_dict=False)[0]
        if after is not None:
            x = after(t, x)
        v, start = None, False
    return x


def sample(velocity: Velocity, noise: torch.Tensor, schedule: Schedule, after: AfterStep | None = None) -> torch.Tensor:
    """The pipeline's denoising loop: noise (B, C, F, H, W) -> clean latent, every step at the noise's size."""
    sched = schedule.start(noise.device)
    return scheduler_steps(velocity, noise, sched, schedule.steps, schedule.steps, start=True, after=after)


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


def reshift(
    x: torch.Tensor,
    v: torch.Tensor | None,
    s: float,
    size: tuple[int, int],
    rule: Rule,
    noise: torch.Tensor | None = None,
    down: str = "area",
) -> Reshift:
    """Switch a latent at noise level `s` from (H, W) to `size` by a rule of docs/method.md#noise-reshifting.

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
    """Settings of one noise-reshifting run: the base model's schedule, the switch and the preview."""

    schedule: Schedule
    switch: int  # k: steps run before the switch
    preview_size: tuple[int, int]  # latent (h, w) of the preview
    rule: Rule = "pool"
    down: DownMode = "area"

    def __post_init__(self):
        if not 0 <= self.switch <= self.steps:
            raise ConfigError(f"switch step must be in [0, steps={self.steps}], got {self.switch}")
        if self.rule not in RULES:
            raise ConfigError(f"unknown re-noise rule {self.rule!r}; choose from {RULES}")
        if self.down not in DOWN_MODES:
            raise ConfigError(f"unknown downsampling kernel {self.down!r}; choose from {DOWN_MODES}")

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.sigmas


# Across the switch the scheduler's state is not carried over. A multistep solver (UniPC, DPM-Solver++) keeps
# the model outputs of its last steps at the old resolution; they are neither the size of the new latent nor,
# after re-noising, on its trajectory. So the low-resolution run is a fresh scheduler of the same class and
# solver settings on the remaining levels (`scheduler_on`): it restarts at order 1 (its history is empty) and
# climbs back to its configured order over the next steps, exactly as it does at the start of any run.
# At the switch the clean-latent estimate uses the velocity at the latent the prefix's last step produced (the
# same call the native run's step k makes); UniPC's corrector for that latent, which would need the old-resolution
# history, is not applied. FlowMatchEuler has no state, so only the grid changes for it.


def _switch(
    velocity: Velocity,
    x: torch.Tensor,
    plan: PreviewPlan,
    sched: Any,
    fresh_noise: torch.Tensor | None,
    start: bool = False,
):
    """Returns (v at the switch or None, Reshift); sched: the started native scheduler, standing at the switch."""
    k, s_k = plan.switch, float(plan.sigmas[plan.switch])
    v = None
    if plan.rule != "pool" and s_k > 0:
        v = velocity(x, Step(s_k, sched.timesteps[k], k, plan.steps, "native", start))
    return v, reshift(x, v, s_k, plan.preview_size, plan.rule, fresh_noise, plan.down)


def _low_res(velocity: Velocity, r: Reshift, plan: PreviewPlan, start: bool, after: AfterStep | None = None):
    """The steps after the switch at preview size, on a fresh scheduler (see above)."""
    levels = low_res_sigmas(plan.sigmas, plan.switch, plan.rule, r.gain)  # (steps - switch + 1,), last 0
    if len(levels) == 1:  # switch == steps: nothing left to denoise
        return r.x
    sched = scheduler_on(plan.schedule.scheduler, levels, r.x.device)
    n = len(levels) - 1
    return scheduler_steps(velocity, r.x, sched, n, plan.steps, "low", plan.switch, start=start, after=after)


def preview_sample(
    velocity: Velocity,
    noise: torch.Tensor,
    plan: PreviewPlan,
    fresh_noise: torch.Tensor | None = None,
    after: AfterStep | None = None,
) -> torch.Tensor:
    """Noise-reshifting preview: `switch` steps at the noise's resolution, the rest at preview size.

    noise: (B, C, F, H, W) start noise at the prefix resolution; fresh_noise: (B, C, F, h, w) for
    `paper`/`snr`. Returns the clean preview latent (B, C, F, h, w). after: see AfterStep (every step of both).
    """
    sched = plan.schedule.start(noise.device)
    x = scheduler_steps(velocity, noise, sched, plan.switch, plan.steps, start=True, after=after)
    v, r = _switch(velocity, x, plan, sched, fresh_noise, start=plan.switch == 0)
    return _low_res(velocity, r, plan, start=plan.switch == 0 and v is None, after=after)


def finish_preview(
    velocity: Velocity, x: torch.Tensor, plan: PreviewPlan, fresh_noise: torch.Tensor | None = None
) -> torch.Tensor:
    """The switch and the remaining steps at preview size, from x (B, C, F, H, W) at level sigmas[switch].

    Re-previews of real clips start here: the clean target latent noised to sigmas[switch].
    """
    sched = plan.schedule.start(x.device)
    v, r = _switch(velocity, x, plan, sched, fresh_noise, start=True)
    return _low_res(velocity, r, plan, start=v is None)


def pair_sample(
    velocity: Velocity, noise: torch.Tensor, plan: PreviewPlan, fresh_noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(preview, target) sharing the first `switch` steps at the target resolution.

    Branch A continues to the end at full size on the same scheduler (the target: exactly the native run);
    branch B reshifts and finishes at preview size. The velocity at the switch is computed once and used by both.
    """
    sched = plan.schedule.start(noise.device)
    x = scheduler_steps(velocity, noise, sched, plan.switch, plan.steps, start=True)
    v, r = _switch(velocity, x, plan, sched, fresh_noise, start=plan.switch == 0)
    preview = _low_res(velocity, r, plan, start=plan.switch == 0 and v is None)
    if plan.switch == plan.steps:
        return preview, x
    target = scheduler_steps(velocity, x, sched, plan.steps - plan.switch, plan.steps, v=v)
    return preview, target


def count_calls(plan: PreviewPlan) -> dict[str, int]:
    """Network evaluations at each resolution for a shared-prefix pair and for separate runs."""
    n, k = plan.steps, plan.switch
    extra = int(plan.rule != "pool" and k < n)  # paper/snr evaluate v once more at the switch
    return {"shared_high": n, "shared_low": n - k, "separate_high": n + k + extra, "separate_low": n - k}
