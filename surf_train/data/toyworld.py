"""The toy world: one flat shape moving in a straight line over a flat background, with its caption.

Every clip is deterministic in (caption, seed) and renders at any resolution and frame count:
positions are fractions of the frame, sizes fractions of its shorter side, and each pixel is the
shape's coverage of a supersampled grid: FINE points per side wherever the size divides FINE, so a
16x16 render is exactly the 32x32 one area-downsampled (other sizes use SUPERSAMPLE^2 per pixel).
The caption fixes colour, shape, direction and background; the seed fixes size, speed and the start:
anywhere across the motion, near the edge the object moves away from along it.

`detect` reads a clip back exactly (colour segmentation against the known palette): per-frame
object centres, colour, shape, background, direction and speed. Videos are (3, F, H, W) in [-1, 1].
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch

OBJECT_COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5), "white": (0.95, 0.95, 0.95)}
SHAPES = ("circle", "bar", "pillar")  # a disc, a 3:1 wide and a 1:3 tall rectangle, all of equal area
# Captions move objects right or down only: with all four directions the 21k-step base learned the axis of the
# motion from the caption (88% of 128 clips) but not its sign (left/right and up/down at chance), README "Toy world".
# The detector still reads all four.
DIRECTIONS = {"right": (1.0, 0.0), "down": (0.0, 1.0)}  # (x, y), y down
FINE = 256  # supersampling grid per side for sizes that divide it
SUPERSAMPLE = 4  # per pixel and axis, for the other sizes
RADIUS = (0.13, 0.16)  # of the shorter side; every shape has the area of the circle of this radius
TRAVEL = (0.4, 0.45)  # distance covered over the clip, as a fraction of the frame along the motion
ENTRY = 0.04  # the start along the motion lies within this of the edge it moves away from (across it: anywhere)
ASPECT = 3.0  # a bar is ASPECT times wider than tall, a pillar ASPECT times taller than wide
_LONG, _SHORT = np.sqrt(np.pi * ASPECT) / 2, np.sqrt(np.pi / ASPECT) / 2  # half sides, in radii, of equal area
EXTENT = {"circle": (1.0, 1.0), "bar": (_LONG, _SHORT), "pillar": (_SHORT, _LONG)}  # (x, y) half extent in radii
_CAPTION = re.compile(r"^a (\w+) (\w+) moving (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    direction: str
    background: str

    def __str__(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"

    @classmethod
    def parse(cls, text: str) -> Caption:
        m = _CAPTION.match(text.strip())
        if not m:
            raise ValueError(
                f"not a toy-world caption: {text!r} (expected 'a <colour> <shape> moving "
                f"<direction> on a <background> background')"
            )
        cap = cls(*m.groups())
        for field, value, allowed in (
            ("colour", cap.colour, OBJECT_COLOURS),
            ("shape", cap.shape, SHAPES),
            ("direction", cap.direction, DIRECTIONS),
            ("background", cap.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise ValueError(f"caption {text!r}: unknown {field} {value!r}; known: {list(allowed)}")
        return cap


def all_captions() -> list[str]:
    """Every caption of the grammar (4 colours x 3 shapes x 2 directions x 3 backgrounds = 72)."""
    return [str(Caption(*c)) for c in itertools.product(OBJECT_COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)]


def _rng(*keys) -> np.random.Generator:
    """Generator seeded from a stable hash (python's hash() is salted per process)."""
    h = hashlib.sha256("\x1f".join(str(k) for k in keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


@dataclass(frozen=True)
class Motion:
    """What the seed decides: radius (of the shorter side), start and velocity (fractions of the frame)."""

    radius: float
    start: tuple[float, float]  # (x, y) centre at the first frame, fractions of width and height
    travel: float  # fraction of the frame covered along the direction over the whole clip

    def centres(self, caption: Caption, frames: int) -> np.ndarray:
        """(F, 2) object centre per frame as fractions of (width, height)."""
        dx, dy = DIRECTIONS[caption.direction]
        t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
        return np.stack([self.start[0] + dx * self.travel * t, self.start[1] + dy * self.travel * t], 1)


def motion(caption: Caption, seed: int) -> Motion:
    r = _rng("toyworld", str(caption), seed)
    radius, travel = r.uniform(*RADIUS), r.uniform(*TRAVEL)
    dx, dy = DIRECTIONS[caption.direction]
    start = []
    for d, extent in zip((dx, dy), EXTENT[caption.shape]):  # along the motion: leave room to travel; across: anywhere
        lo, hi = radius * extent + 0.01, 1.0 - radius * extent - 0.01  # keeps the whole shape inside the frame
        if d > 0:
            start.append(r.uniform(lo, min(lo + ENTRY, hi - travel)))
        elif d < 0:
            start.append(r.uniform(max(hi - ENTRY, lo + travel), hi))
        else:
            start.append(r.uniform(lo, hi))
    return Motion(radius=float(radius), start=(float(start[0]), float(start[1])), travel=float(travel))


def coverage(shape: str, centre_px: tuple[float, float], radius_px: float, height: int, width: int) -> np.ndarray:
    """(H, W) fraction of each pixel covered by the shape, from a supersampled grid (module docstring)."""
    sy, sx = (FINE // n if FINE % n == 0 else SUPERSAMPLE for n in (height, width))
    ys = (np.arange(height * sy) + 0.5) / sy
    xs = (np.arange(width * sx) + 0.5) / sx
    dx, dy = xs[None, :] - centre_px[0], ys[:, None] - centre_px[1]
    if shape == "circle":
        inside = dx**2 + dy**2 <= radius_px**2
    elif shape in ("bar", "pillar"):  # rectangles with the circle's area
        ex, ey = EXTENT[shape]
        inside = (np.abs(dx) <= ex * radius_px) & (np.abs(dy) <= ey * radius_px)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return inside.reshape(height, sy, width, sx).mean(axis=(1, 3))


def render(caption: str | Caption, seed: int, size: tuple[int, int] = (32, 32), frames: int = 9) -> torch.Tensor:
    """(3, F, H, W) float32 clip in [-1, 1], deterministic in (caption, seed)."""
    cap = caption if isinstance(caption, Caption) else Caption.parse(caption)
    height, width = size
    mo = motion(cap, seed)
    obj = np.array(OBJECT_COLOURS[cap.colour])[:, None, None]
    bg = np.array(BACKGROUNDS[cap.background])[:, None, None]
    out = np.empty((3, frames, height, width))
    for f, (cx, cy) in enumerate(mo.centres(cap, frames)):
        a = coverage(cap.shape, (cx * width, cy * height), mo.radius * min(height, width), height, width)
        out[:, f] = bg * (1 - a) + obj * a
    return torch.from_numpy(out * 2 - 1).float()


def render_batch(
    captions: list[str], seeds: list[int], size: tuple[int, int] = (32, 32), frames: int = 9
) -> torch.Tensor:
    """(B, 3, F, H, W) for paired lists of captions and seeds."""
    return torch.stack([render(c, s, size, frames) for c, s in zip(captions, seeds)])


# --- the detector ---------------------------------------------------------------------------------
@dataclass
class Detection:
    """What `detect` reads from a clip; `found` is False when no object pixels were seen."""

    background: str
    colour: str | None
    shape: str | None
    centres: np.ndarray  # (F, 2) fractions of (width, height); NaN where the object is missing
    velocity: tuple[float, float]  # fraction of the frame per clip (first to last frame), (x, y)
    found: bool

    @property
    def direction(self) -> str | None:
        vx, vy = self.velocity
        if not self.found or max(abs(vx), abs(vy)) < 0.03:
            return None
        if abs(vx) >= abs(vy):
            return "right" if vx > 0 else "left"
        return "down" if vy > 0 else "up"

    @property
    def speed(self) -> float:
        """Distance covered over the clip as a fraction of the frame (0 when not found)."""
        return float(np.hypot(*self.velocity)) if self.found else 0.0

    def matches(self, caption: str | Caption) -> dict[str, bool]:
        cap = caption if isinstance(caption, Caption) else Caption.parse(caption)
        return {
            "colour": self.colour == cap.colour,
            "shape": self.shape == cap.shape,
            "direction": self.direction == cap.direction,
            "background": self.background == cap.background,
        }


def _palette_labels(video: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F, H, W, 3) colours in [0, 1] and (F, H, W) index of the nearest entry of backgrounds + object colours."""
    v = video.detach().float().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video, float)
    if v.ndim != 4 or v.shape[0] != 3:
        raise ValueError(f"detect expects a (3, F, H, W) clip, got shape {tuple(v.shape)}")
    rgb = np.moveaxis((v + 1) / 2, 0, -1)  # (F, H, W, 3) in [0, 1]
    palette = np.array([*BACKGROUNDS.values(), *OBJECT_COLOURS.values()])  # (7, 3)
    return rgb, np.argmin(((rgb[..., None, :] - palette) ** 2).sum(-1), -1)


def _alpha(rgb: np.ndarray, label: np.ndarray, background: str, colour: str) -> np.ndarray:
    """(F, H, W) soft coverage: where each pixel lies between the background and the object colour."""
    b, o = np.array(BACKGROUNDS[background]), np.array(OBJECT_COLOURS[colour])
    alpha = np.clip(((rgb - b) @ (o - b)) / ((o - b) @ (o - b)), 0.0, 1.0)
    other = (label >= len(BACKGROUNDS)) & (label != len(BACKGROUNDS) + list(OBJECT_COLOURS).index(colour))
    return np.where(other, 0.0, alpha)  # pixels of another object colour are not this object


def object_mask(
    video: torch.Tensor | np.ndarray, det: Detection | None = None, threshold: float = 0.5, dilate: int = 0
) -> np.ndarray:
    """(F, H, W) bool: pixels the detected object covers at least `threshold`, grown by `dilate` pixels
    (a (2 dilate + 1)^2 square, per frame). All False where nothing was detected."""
    rgb, label = _palette_labels(video)
    det = detect(video) if det is None else det
    if det.colour is None:
        return np.zeros(rgb.shape[:3], bool)
    mask = _alpha(rgb, label, det.background, det.colour) >= threshold
    if dilate > 0:
        m = torch.from_numpy(mask).float()[:, None]  # (F, 1, H, W)
        mask = torch.nn.functional.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)[:, 0].numpy() > 0
    return mask


def detect(video: torch.Tensor | np.ndarray, min_area_px: float = 2.0) -> Detection:
    """Read colour, shape, background and the per-frame centre of the object in a (3, F, H, W) clip."""
    rgb, label = _palette_labels(video)
    frames, height, width = rgb.shape[:3]
    names = list(BACKGROUNDS) + list(OBJECT_COLOURS)
    nb = len(BACKGROUNDS)
    background = names[int(np.argmax(np.bincount(label.ravel(), minlength=len(names))[:nb]))]
    obj_counts = np.bincount(label.ravel(), minlength=len(names))[nb:]
    if obj_counts.sum() < min_area_px:
        return Detection(background, None, None, np.full((frames, 2), np.nan), (0.0, 0.0), False)
    colour = names[nb + int(np.argmax(obj_counts))]
    alpha = _alpha(rgb, label, background, colour)
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    centres = np.full((frames, 2), np.nan)
    area = alpha.sum((1, 2))
    ok = area >= min_area_px
    centres[ok, 0] = (alpha[ok] * xs).sum((1, 2)) / area[ok] / width
    centres[ok, 1] = (alpha[ok] * ys[:, None]).sum((1, 2)) / area[ok] / height
    if not ok.any():
        return Detection(background, colour, None, centres, (0.0, 0.0), False)
    # shape: the equal-area template that best explains the coverage, summed over frames
    radius = np.sqrt(np.median(area[ok]) / np.pi)
    cost = {
        s: sum(
            np.abs(alpha[f] - coverage(s, (centres[f, 0] * width, centres[f, 1] * height), radius, height, width)).sum()
            for f in np.flatnonzero(ok)
        )
        for s in SHAPES
    }
    shape = min(cost, key=cost.get)
    idx = np.flatnonzero(ok)
    if len(idx) >= 2:
        t = idx / max(frames - 1, 1)
        vx, vy = (np.polyfit(t, centres[idx, k], 1)[0] for k in (0, 1))
    else:
        vx = vy = 0.0
    return Detection(background, colour, shape, centres, (float(vx), float(vy)), True)


def truth(caption: str | Caption, seed: int, frames: int = 9) -> tuple[np.ndarray, tuple[float, float]]:
    """Ground-truth (F, 2) centres and clip velocity of `render(caption, seed, ., frames)`."""
    cap = caption if isinstance(caption, Caption) else Caption.parse(caption)
    mo = motion(cap, seed)
    dx, dy = DIRECTIONS[cap.direction]
    return mo.centres(cap, frames), (dx * mo.travel, dy * mo.travel)
