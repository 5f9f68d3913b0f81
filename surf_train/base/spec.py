"""A base model's constants (`BaseSpec`, one conf/base/<name>.yaml each) and its latent geometry."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from surf_train.base.sampling import SCHEDULERS
from surf_train.common.dtypes import DTYPES
from surf_train.common.errors import ConfigError


def latent_frames(frames: int, stride_t: int) -> int:
    """Latent frames of a `frames`-long video: the VAE keeps the first frame and compresses the rest by stride_t."""
    return (frames - 1) // stride_t + 1


@dataclass(frozen=True)
class LatentGeometry:
    """How pixels map to latents and latents to transformer tokens."""

    channels: int
    stride_t: int  # VAE temporal compression: frames = stride_t * (F - 1) + 1
    stride_s: int  # VAE spatial compression
    patch_t: int
    patch_s: int

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of the latent of a (frames, height, width) video; validates first."""
        self.check(frames, height, width)
        return (self.channels, latent_frames(frames, self.stride_t), height // self.stride_s, width // self.stride_s)

    def check(self, frames: int | None, height: int, width: int, what: str = "size") -> None:
        """Raise ConfigError unless the sizes are ones the VAE and the patchifier accept exactly."""
        mult = self.stride_s * self.patch_s
        for name, val in (("height", height), ("width", width)):
            if not isinstance(val, int) or val <= 0 or val % mult:
                raise ConfigError(
                    f"{what} {name}={val} must be a positive multiple of {mult} "
                    f"(VAE stride {self.stride_s} x patch {self.patch_s})"
                )
        if frames is not None:
            if not isinstance(frames, int) or frames < 1 or (frames - 1) % self.stride_t:
                raise ConfigError(f"{what} frames={frames} must be {self.stride_t}*n+1 (VAE temporal stride)")
            if latent_frames(frames, self.stride_t) % self.patch_t:
                raise ConfigError(f"{what} frames={frames}: latent frames not divisible by patch {self.patch_t}")


@dataclass
class BaseSpec:
    """One base model's constants: the contents of conf/base/<name>.yaml."""

    name: str
    family: str  # wan | hunyuan | hunyuan15
    pretrained: str | None  # hub id or local directory; None builds the tiny model from configs
    channels: int
    stride_t: int
    stride_s: int
    patch_t: int
    patch_s: int
    native_size: tuple[int, int]  # (height, width) in pixels
    native_frames: int
    fps: int
    guidance: float  # CFG scale; with two experts, the high-noise one's (WanPipeline's guidance_scale)
    boundary: float | None = None  # Wan 2.2 A14B: transformer while t >= boundary * T, else transformer_2; None: one
    guidance_2: float | None = None  # the low-noise expert's CFG scale (guidance_scale_2); None: = guidance
    shift: float | None = None  # None: the pipeline scheduler's own (its config); else an override, e.g. per size
    scheduler: str | None = None  # None: the pipeline's scheduler class; else a class in sampling.SCHEDULERS
    revision: str | None = None
    negative_prompt: str = ""
    max_sequence_length: int = 512
    dtype: str = "bfloat16"
    vae_dtype: str = "float32"
    prompt_template: dict | None = None  # hunyuan only; None = diffusers' default template
    vae_class: str | None = None  # None: the family's VAE; "pixel_shuffle": the toy world's exact latent
    prompts: str | None = None  # built-in prompts when none are given: None (everyday scenes) | toyworld
    tiny: str | None = None  # pretrained null: None builds the family's tiny model, else a key of tiny.TINY_BUILDS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"base model {d.get('name')!r}: unknown keys {unknown}")
        d = dict(d)
        d["native_size"] = tuple(d["native_size"])
        if d["family"] not in ("wan", "hunyuan", "hunyuan15"):
            raise ConfigError(f"base model {d.get('name')!r}: unknown family {d['family']!r} (wan, hunyuan, hunyuan15)")
        if d.get("prompts") not in (None, "toyworld"):
            raise ConfigError(f"base model {d.get('name')!r}: prompts={d['prompts']!r} not in [None, 'toyworld']")
        if d.get("scheduler") not in (None, *SCHEDULERS):
            raise ConfigError(
                f"base model {d.get('name')!r}: scheduler={d['scheduler']!r} not in "
                f"[None, {', '.join(map(repr, SCHEDULERS))}]"
            )
        if d.get("vae_class") not in (None, "pixel_shuffle"):
            raise ConfigError(
                f"base model {d.get('name')!r}: vae_class={d['vae_class']!r} not in [None, 'pixel_shuffle']"
            )
        if d.get("tiny") is not None:
            from surf_train.base.tiny import TINY_BUILDS

            if d["tiny"] not in TINY_BUILDS:
                known = ", ".join(map(repr, TINY_BUILDS))
                raise ConfigError(f"base model {d.get('name')!r}: tiny={d['tiny']!r} not in [None, {known}]")
        for key in ("dtype", "vae_dtype"):
            if d.get(key, "float32") not in DTYPES:
                raise ConfigError(f"base model {d.get('name')!r}: {key}={d[key]!r} not in {list(DTYPES)}")
        _check_experts(d)
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> BaseSpec:
        """Read conf/base/<name>.yaml."""
        import yaml

        from surf_train import CONF_DIR

        path = CONF_DIR / "base" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (CONF_DIR / "base").glob("*.yaml"))
            raise ConfigError(f"unknown base model {name!r}; known: {known}")
        return cls.from_dict(yaml.safe_load(path.read_text()))

    @property
    def geometry(self) -> LatentGeometry:
        return LatentGeometry(self.channels, self.stride_t, self.stride_s, self.patch_t, self.patch_s)

    @property
    def source(self) -> str | None:
        """What from_pretrained loads: a directory shipped in the repo (assets/...) wins over a hub id."""
        from surf_train import CONF_DIR

        if self.pretrained and not os.path.isabs(self.pretrained) and (CONF_DIR.parent / self.pretrained).exists():
            return str(CONF_DIR.parent / self.pretrained)
        return self.pretrained

    @property
    def model_id(self) -> str:
        return self.pretrained or f"tiny:{self.name}"


def _check_experts(d: dict[str, Any]) -> None:
    """`boundary` and `guidance_2`: two experts are a Wan 2.2 pipeline's; guidance_2 needs the boundary."""
    where, b = f"base model {d.get('name')!r}", d.get("boundary")
    if b is not None and (d["family"] != "wan" or not 0 < b < 1):
        raise ConfigError(f"{where}: boundary={b} needs family wan and 0 < boundary < 1 (or null: one expert)")
    if d.get("guidance_2") is not None and b is None:
        raise ConfigError(f"{where}: guidance_2 needs a boundary (two experts), as WanPipeline's guidance_scale_2")
