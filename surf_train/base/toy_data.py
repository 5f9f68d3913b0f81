"""Procedural toy clips rendered directly in latent space, for training the `toy` base model.

The tiny VAE is random, so pixel data would mean nothing; instead each clip is a (C=16, F, S, S) latent:
soft-edged discs and squares (some striped) moving linearly over a smooth background gradient.
The prompt (hashed) fixes what is visible in every clip of that prompt: palette, object count, shapes,
stripes and motion direction; the seed fixes positions, sizes, speed and small colour jitter.

Every resolution is the area average of one fine render (supersampled on a grid of `FINE` pixels per
side), so `render_clip(p, s, 8)` equals `render_clip(p, s, 16)` area-downsampled to 8x8 up to float
rounding: the same content at every resolution, with edges and stripes that only the finer grid resolves.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHANNELS = 16
FRAMES = 5
FINE = 64  # fine render grid per side; every output size must divide it
EDGE = 0.6 / FINE  # soft-edge width in unit coordinates (sharp at 16x16, i.e. about 1/7 latent pixel)
STRIPE_PERIOD = 2.5 / 16  # unit coordinates: 2.5 latent pixels at 16x16, averaged away at 8x8
SCALE = 1.95  # brings the per-element std of the clips to about 1 (raw std 0.514 over builtin prompts)


def _rng(*keys) -> np.random.Generator:
    """Generator seeded from a stable hash (python's hash() is salted per process)."""
    h = hashlib.sha256("\x1f".join(str(k) for k in keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


@dataclass(frozen=True)
class PromptLook:
    """What the prompt decides."""
    n_objects: int
    colours: np.ndarray  # (3, C) object colour per slot
    shapes: tuple[str, ...]  # per slot: disc | square
    striped: tuple[bool, ...]  # per slot
    direction: float  # motion angle in radians (shared by all objects)
    bg: np.ndarray  # (2, C) background gradient end colours
    bg_angle: float


def prompt_look(prompt: str, channels: int = CHANNELS) -> PromptLook:
    r = _rng("prompt", prompt)
    return PromptLook(n_objects=int(r.integers(1, 4)), colours=r.normal(0, 1.3, (3, channels)),
                      shapes=tuple(r.choice(["disc", "square"], 3).tolist()),
                      striped=tuple((r.random(3) < 0.5).tolist()), direction=float(r.uniform(0, 2 * np.pi)),
                      bg=r.normal(0, 0.5, (2, channels)), bg_angle=float(r.uniform(0, 2 * np.pi)))


def _fine_clip(prompt: str, seed: int, frames: int, channels: int, fine: int) -> np.ndarray:
    """(C, F, fine, fine) render with each fine pixel point-sampled at its centre."""
    look, r = prompt_look(prompt, channels), _rng("clip", prompt, seed)
    u = (np.arange(fine) + 0.5) / fine
    yy, xx = np.meshgrid(u, u, indexing="ij")  # (fine, fine)
    ramp = (xx - 0.5) * np.cos(look.bg_angle) + (yy - 0.5) * np.sin(look.bg_angle) + 0.5
    clip = look.bg[0][:, None, None] + (look.bg[1] - look.bg[0])[:, None, None] * ramp  # (C, fine, fine)
    clip = np.repeat(clip[:, None], frames, axis=1).copy()  # (C, F, fine, fine)
    t = np.linspace(-0.5, 0.5, frames) if frames > 1 else np.zeros(1)
    for k in range(look.n_objects):
        radius = r.uniform(0.08, 0.2)
        centre = r.uniform(0.25, 0.75, 2)  # (x, y) at the middle frame
        angle = look.direction + r.normal(0, 0.2)
        vel = r.uniform(0.15, 0.4) * np.array([np.cos(angle), np.sin(angle)])
        colour = look.colours[k] + r.normal(0, 0.15, channels)  # (C,)
        for f in range(frames):
            cx, cy = centre + vel * t[f]
            dx, dy = xx - cx, yy - cy
            if look.shapes[k] == "disc":
                d = np.sqrt(dx**2 + dy**2) - radius  # signed distance, negative inside
            else:
                d = np.maximum(np.abs(dx), np.abs(dy)) - radius * 0.85
            mask = 1.0 / (1.0 + np.exp(np.clip(d / EDGE, -50, 50)))  # (fine, fine)
            if look.striped[k]:
                # stripes move with the object, so they are predictable from its position
                mask = mask * (0.55 + 0.45 * np.sin(2 * np.pi * (dx + dy) / STRIPE_PERIOD))
            clip[:, f] = clip[:, f] * (1 - mask) + colour[:, None, None] * mask
    return clip


def render_clip(prompt: str, seed: int, size: int = 16, frames: int = FRAMES, channels: int = CHANNELS) -> torch.Tensor:
    """Latent clip (C, F, size, size) float32, deterministic in (prompt, seed); size must divide 64."""
    fine = max(FINE, size)
    if fine % size:
        raise ValueError(f"size {size} must divide the fine grid {fine}")
    x = torch.from_numpy(_fine_clip(prompt, seed, frames, channels, fine)).float() * SCALE
    return F.avg_pool2d(x.reshape(channels * frames, 1, fine, fine), fine // size).reshape(
        channels, frames, size, size)


def render_batch(prompts: list[str], seeds: list[int], size: int = 16, frames: int = FRAMES) -> torch.Tensor:
    """(B, C, F, size, size) for paired lists of prompts and seeds."""
    return torch.stack([render_clip(p, s, size, frames) for p, s in zip(prompts, seeds)])
