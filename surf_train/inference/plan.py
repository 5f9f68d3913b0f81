"""What one SurfPipeline call runs: its sizes (`plan_sizes`, `default_prefix`) and its `SurfPlan`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from surf_train.base import BaseSpec
from surf_train.base.sampling import Schedule
from surf_train.common.errors import ConfigError

log = logging.getLogger("surf_train")


MODES = ("surf", "baseline", "preview")
SIZE_ARGS = {  # the call's arguments of each size
    "target": ("height", "width"),
    "prefix": ("prefix_height", "prefix_width"),
    "preview": ("preview_height", "preview_width"),
}


def _as_args(check, frames, h, w, what: str) -> None:
    """LatentGeometry.check with the call's argument names in its message (`prefix height=` -> `prefix_height=`)."""
    try:
        check(frames, h, w, what)
    except ConfigError as e:
        msg, (a_h, a_w) = str(e), SIZE_ARGS[what]
        msg = msg.replace(f"{what} height=", f"{a_h}=").replace(f"{what} width=", f"{a_w}=")
        raise ConfigError(msg.replace(f"{what} frames=", "num_frames=")) from None


def check_call(
    mode: str = "surf",
    num_inference_steps: int = 20,
    switch: int = 5,
    refiner_steps: int | None = None,
    rule: str = "pool",
    down: str = "area",
    **sizes: int | None,
) -> None:
    """ConfigError, naming the argument, for settings of a call no model can run (checked before loading one).

    sizes: num_frames and the pixel sizes (height, prefix_width, ...); None: the base model's default."""
    from surf_train.base.sampling import DOWN_MODES, RULES

    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}: choose from {MODES}")
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps={num_inference_steps}: needs at least 1 base-model step")
    if refiner_steps is not None and refiner_steps < 1:
        raise ConfigError(f"refiner_steps={refiner_steps}: needs at least 1 Refiner step")
    if not 0 <= switch <= num_inference_steps:
        raise ConfigError(f"switch={switch} must be in [0, num_inference_steps={num_inference_steps}]")
    if rule not in RULES:
        raise ConfigError(f"rule={rule!r}: choose from {RULES}")
    if down not in DOWN_MODES:
        raise ConfigError(f"down={down!r}: choose from {DOWN_MODES}")
    for name, v in sizes.items():  # 0 would silently mean "the default"
        if v is not None and v < 1:
            raise ConfigError(f"{name}={v} must be >= 1 (None: the base model's)")


def _on_grid(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def default_prefix(target: tuple[int, int], native: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The target's aspect ratio at the base model's native pixel count, on the size grid (`multiple`)."""
    if target[0] * native[1] == target[1] * native[0]:
        return tuple(native)
    area, aspect = native[0] * native[1], target[1] / target[0]
    return _on_grid((area / aspect) ** 0.5, multiple), _on_grid((area * aspect) ** 0.5, multiple)


def plan_sizes(
    spec: BaseSpec,
    height=None,
    width=None,
    prefix=(None, None),
    preview=(None, None),
    mode: str = "surf",
    switch: int = 1,
) -> dict[str, tuple[int, int]]:
    """Pixel (h, w) of the target, prefix and preview; None: the base model's defaults (docs/method.md)."""
    h, w = height or spec.native_size[0], width or spec.native_size[1]
    g = spec.geometry
    m = g.stride_s * g.patch_s
    dp = default_prefix((h, w), spec.native_size, m)
    # default preview: half the target on the size grid (HunyuanVideo 720p: 352x640, as 360 is off the grid)
    sizes = {
        "target": (h, w),
        "prefix": (prefix[0] or dp[0], prefix[1] or dp[1]),
        "preview": (preview[0] or _on_grid(h / 2, m), preview[1] or _on_grid(w / 2, m)),
    }
    for name, (sh, sw) in sizes.items():
        _as_args(g.check, None, sh, sw, name)
    if sizes["preview"][0] > h or sizes["preview"][1] > w:
        raise ConfigError(f"preview {sizes['preview']} is larger than target {(h, w)}")
    if (
        mode != "baseline"
        and switch
        and (sizes["prefix"][0] < sizes["preview"][0] or sizes["prefix"][1] < sizes["preview"][1])
    ):
        log.warning(
            "prefix %s is smaller than the preview %s: the switch resamples upward (set prefix_height/prefix_width)",
            sizes["prefix"],
            sizes["preview"],
        )
    return sizes


def check_target(spec: BaseSpec, frames: int, target: tuple[int, int]) -> None:
    """ConfigError unless the VAE and the patchifier take the target video exactly (argument names in it)."""
    _as_args(spec.geometry.check, frames, *target, "target")


@dataclass
class SurfPlan:
    """What one call runs: sizes in pixels and latents, the schedule, the Refiner's steps, stage names."""

    mode: str
    sizes: dict[str, tuple[int, int]]  # pixels: target, prefix, preview
    frames: int
    lat: dict[str, tuple[int, int]]  # latent (h, w) of each size
    f_lat: int  # latent frames
    schedule: Schedule
    refiner_steps: int  # 0 unless mode == "surf"
    names: dict[tuple[int, int], str]  # latent (h, w) -> report stage of the base-model calls made there
