"""(preview, target) pairs from real videos (the engine behind data_prep/make_video_pairs.py).

Each video gives up to `clips_per_video` clips: resampled to the base model's frame rate, `frames` long
(a count the VAE accepts), cropped to the aspect ratio of the nearest bucket and resized to it. The
target is the VAE latent of the clip. The preview is made in one of two ways:
  degrade    pixel chain (blur, downscale, noise, JPEG) -> VAE at preview size -> latent blur and noise
  repreview  target latent noised to the switch level s_k -> noise reshifting to preview size -> the base
             model's remaining steps there (the base model's own low-resolution signature, real target)
Shards, resume and rank slicing are those of generated pairs (surf_train.data.pairs); ranks split the videos.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from hydra.core.config_store import ConfigStore

from surf_train import __version__
from surf_train.base import BaseModel, BaseSpec, latent_frames, load_base_model
from surf_train.base.sampling import DownMode, PreviewPlan, Rule, finish_preview
from surf_train.common.config import check, schema
from surf_train.common.dist_env import rank_world
from surf_train.common.dtypes import DTYPES, DType
from surf_train.common.errors import ConfigError, known_keys
from surf_train.data.degrade import DegradeConfig, degrade_latent, degrade_pixels, sample_params
from surf_train.data.meta import base_fingerprint, base_meta, expert_meta, preview_kind, schedule_meta
from surf_train.data.pairs import check_schedule, check_storage, open_out_dir, settings, write_samples
from surf_train.data.shards import OutDirLock
from surf_train.data.video import (
    BACKENDS,
    CROPS,
    Video,
    VideoEntry,
    VideoError,
    VideoInfo,
    clip_indices,
    clip_span,
    clip_starts,
    crop_box,
    list_videos,
    pick_bucket,
    to_clip,
    write_synthetic_video,
)

log = logging.getLogger(__name__)

PREFIX = "video"
MODES = ("degrade", "repreview")
SKIP_REASONS = ("too_short", "too_small", "unreadable")


@dataclass
class RepreviewConfig:
    """The base model's schedule for `repreview`: the preview continues from step `switch` of `steps`."""

    steps: int = 20
    switch: int = 5
    shift: float | None = None  # None: the base model's default
    guidance: float | None = None
    rule: Rule = "paper"  # re-noise rule at the switch
    down: DownMode = "area"

    def __post_init__(self):
        check(self, "repreview.")
        check_schedule(self.steps, self.switch, self.rule, self.down, "repreview.")

    @classmethod
    def from_dict(cls, d: dict | None) -> RepreviewConfig:
        return cls(**known_keys(d, cls, "repreview"))


@dataclass(frozen=True)
class Bucket:
    """Target size and its preview size, in pixels."""

    height: int
    width: int
    preview_height: int
    preview_width: int


@dataclass
class VideoPairsConfig:
    """Settings of one make_video_pairs run (the Hydra config, minus Hydra)."""

    base: BaseSpec
    videos: str | None = None  # directory, .txt list or .csv (path[, caption]); None: synthetic demo videos
    out_dir: str = "data/video_pairs"
    mode: Literal[MODES] = "degrade"  # degrade: degraded clip; repreview: the base model's own low-resolution finish
    frames: int | None = None  # clip length at `fps`; None: the base model's native frame count
    fps: float | None = None  # None: the base model's frame rate
    buckets: list | None = None  # [[H, W] or [H, W, h, w], ...]; None: [native size]
    preview_scale: float = 0.5  # preview size of [H, W] buckets, floored to what the VAE/patchifier accept
    clips_per_video: int = 2
    max_upscale: float = 1.0  # videos whose crop must be enlarged more than this are skipped (too small)
    crop: Literal[CROPS] = "center"  # random: seeded per clip
    backend: Literal[BACKENDS] = "auto"  # auto: decord, PyAV where decord is missing or fails
    caption_column: str = "caption"  # in a .csv list
    prompt: str = ""  # text for videos without a caption
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    repreview: RepreviewConfig = field(default_factory=RepreviewConfig)
    seed: int = 0  # degradation draws and re-preview noise: seeded by (seed, clip key)
    dtype: DType = "float16"  # storage dtype of the latents
    store_text: bool = True  # store the caption's (or prompt's) text embeddings
    shard_size: int = 4  # samples per shard: the demo's 8 clips make 2 shards, so data=mixed can hold one out
    device: str = "auto"
    progress: bool = True
    demo_videos: int = 4  # synthetic videos written to out_dir/demo_videos when videos is None

    def __post_init__(self):
        check(self)

    @classmethod
    def from_dict(cls, d: dict) -> VideoPairsConfig:
        kw = settings(cls, d, "make_video_pairs")
        kw["degrade"] = DegradeConfig.from_dict(kw.get("degrade"))
        kw["repreview"] = RepreviewConfig.from_dict(kw.get("repreview"))
        return cls(**kw)

    def resolved(self) -> VideoPairsConfig:
        """A copy with the base model's defaults filled in and buckets as `Bucket`s, validated."""
        b, g = self.base, self.base.geometry
        r = replace(
            self.repreview,
            shift=b.shift if self.repreview.shift is None else self.repreview.shift,
            guidance=b.guidance if self.repreview.guidance is None else self.repreview.guidance,
        )
        c = replace(self, frames=self.frames or b.native_frames, fps=float(self.fps or b.fps), repreview=r)
        if not 0 < c.preview_scale <= 1:
            raise ConfigError(f"preview_scale={c.preview_scale} must be in (0, 1]")
        mult = g.stride_s * g.patch_s
        buckets = []
        for i, bk in enumerate(c.buckets or [list(b.native_size)]):
            bk = asdict(bk).values() if isinstance(bk, Bucket) else bk  # resolved() twice gives the same
            bk = list(bk) if not isinstance(bk, (int, str)) else [bk]
            if len(bk) not in (2, 4):
                raise ConfigError(f"buckets[{i}]={bk}: give [height, width] or [height, width, preview_h, preview_w]")
            if len(bk) == 2:
                bk += [
                    max(mult, int(bk[0] * c.preview_scale) // mult * mult),
                    max(mult, int(bk[1] * c.preview_scale) // mult * mult),
                ]
            g.check(c.frames, bk[0], bk[1], f"buckets[{i}] target")
            g.check(None, bk[2], bk[3], f"buckets[{i}] preview")
            if bk[2] > bk[0] or bk[3] > bk[1]:
                raise ConfigError(f"buckets[{i}]: preview {bk[2]}x{bk[3]} is larger than target {bk[0]}x{bk[1]}")
            buckets.append(Bucket(*bk))
        c.buckets = buckets
        c.validate()
        return c

    def validate(self) -> None:
        if self.fps <= 0:
            raise ConfigError(f"fps={self.fps} must be > 0")
        if self.clips_per_video < 1:
            raise ConfigError(f"clips_per_video={self.clips_per_video} must be >= 1")
        if self.max_upscale <= 0:
            raise ConfigError(f"max_upscale={self.max_upscale} must be > 0")
        if self.demo_videos < 1:
            raise ConfigError(f"demo_videos={self.demo_videos} must be >= 1")
        check_storage(self.dtype, self.shard_size)
        self.degrade.validate()

    def fingerprint(self) -> dict:
        """Everything that changes the content of a pair; a rerun must match it to append."""
        keys = (
            "mode",
            "frames",
            "fps",
            "clips_per_video",
            "max_upscale",
            "crop",
            "caption_column",
            "prompt",
            "seed",
            "dtype",
            "store_text",
        )
        mode = {"degrade": self.degrade.to_dict()} if self.mode == "degrade" else {"repreview": asdict(self.repreview)}
        return {
            **base_fingerprint(self.base),
            **{k: getattr(self, k) for k in keys},
            "buckets": [list(asdict(b).values()) for b in self.buckets],
            **mode,
        }


# the settings dataclass gives every default; conf/make_video_pairs.yaml extends this schema (Hydra resolves it by name)
ConfigStore.instance().store(name="make_video_pairs_schema", node=schema(VideoPairsConfig))


@dataclass(frozen=True)
class Clip:
    video: VideoEntry
    info: VideoInfo
    index: int  # n-th clip of the video
    indices: tuple[int, ...]  # source frames, resampled to the clip's fps
    bucket: Bucket
    box: tuple[int, int, int, int]  # crop (y0, x0, h, w) in source pixels

    @property
    def key(self) -> str:
        # content-addressed: the frame rate, length and crop rule are fixed by the directory's fingerprint
        b = self.bucket
        return hashlib.sha1(f"{self.video.id}\0{self.indices[0]}\0{b.height}x{b.width}".encode()).hexdigest()[:16]


def clip_seed(seed: int, key: str) -> int:
    """Generator seed of one clip: independent of the order, rank and run that makes it."""
    return int(hashlib.sha1(f"{seed}\0{key}".encode()).hexdigest()[:15], 16)


def plan_video(entry: VideoEntry, info: VideoInfo, cfg: VideoPairsConfig) -> tuple[list[Clip], str | None, str]:
    """(clips, None, "") or ([], skip reason, explanation) for one probed video."""
    starts = clip_starts(info.frames, info.fps, cfg.frames, cfg.fps, cfg.clips_per_video)
    if not starts:
        need = clip_span(info.fps, cfg.frames, cfg.fps)
        return (
            [],
            "too_short",
            (f"{info.frames} frames at {info.fps:g} fps; a {cfg.frames}-frame clip at {cfg.fps:g} fps needs {need}"),
        )
    hw = pick_bucket(info.height, info.width, [(b.height, b.width) for b in cfg.buckets])
    bucket = next(b for b in cfg.buckets if (b.height, b.width) == hw)
    clips = []
    for n, start in enumerate(starts):
        rng = random.Random(clip_seed(cfg.seed, f"{entry.id}\0{start}"))
        box = crop_box(info.height, info.width, hw, cfg.crop, rng)
        up = max(bucket.height / box[2], bucket.width / box[3])
        if up > cfg.max_upscale + 1e-9:
            return (
                [],
                "too_small",
                (
                    f"{info.height}x{info.width}, bucket {bucket.height}x{bucket.width} needs "
                    f"x{up:.2f} upscaling > max_upscale={cfg.max_upscale:g}"
                ),
            )
        clips.append(Clip(entry, info, n, tuple(clip_indices(start, info.fps, cfg.frames, cfg.fps)), bucket, box))
    return clips, None, ""


def clip_pair(
    model: BaseModel, cfg: VideoPairsConfig, clip: Clip, frames: np.ndarray, backend: str, cond
) -> tuple[dict, dict]:
    """One clip's (preview, target) -> (tensors, metadata) for the shard schema."""
    b = clip.bucket
    video = to_clip(frames, clip.box, (b.height, b.width), model.device)  # (1, 3, F, H, W) in [0, 1]
    target = model.vae_encode(video * 2 - 1)  # (1, C, F', H/s, W/s)
    gen = torch.Generator().manual_seed(clip_seed(cfg.seed, clip.key))
    if cfg.mode == "degrade":
        p = sample_params(cfg.degrade, gen)
        low = degrade_pixels(video, (b.preview_height, b.preview_width), p, gen)  # (1, 3, F, h, w)
        preview = degrade_latent(model.vae_encode(low * 2 - 1), p, gen)  # (1, C, F', h/s, w/s)
        detail = {"degradation": p}
    else:
        preview, detail = _repreview(model, cfg, b, target, cond, gen)
    dt = DTYPES[cfg.dtype]
    tensors = {"preview": preview[0].to(dt), "target": target[0].to(dt)}
    if cfg.store_text:
        tensors["text"] = cond.text(0).to(dt)  # (L, D) zero-padded; stored at its real length
    meta = {**_clip_meta(cfg, clip, backend), **detail}
    return tensors, {**meta, "preview_kind": preview_kind(meta)}  # degraded, or generated by repreview


def _repreview(
    model: BaseModel, cfg: VideoPairsConfig, b, target: torch.Tensor, cond, gen
) -> tuple[torch.Tensor, dict]:
    """The base model's own preview of a real latent (B, C, F', H, W): noised to the switch level, then finished
    at the preview size; with its schedule metadata."""
    r, s = cfg.repreview, cfg.base.stride_s
    plan = PreviewPlan(
        model.schedule(r.steps, r.shift),
        switch=r.switch,
        rule=r.rule,
        down=r.down,
        preview_size=(b.preview_height // s, b.preview_width // s),
    )
    s_k = float(plan.sigmas[plan.switch])
    eps = torch.randn(target.shape, generator=gen).to(target)
    fresh = torch.randn((*target.shape[:3], *plan.preview_size), generator=gen).to(target)
    x = (1 - s_k) * target + s_k * eps  # the real latent at the switch level
    preview = finish_preview(model.velocity_fn(cond, r.guidance), x, plan, fresh)
    experts = expert_meta(model, plan, tuple(target.shape[-2:]), r.guidance)  # Wan 2.2: only the preview ran
    experts = experts and {k: v for k, v in experts.items() if k not in ("prefix", "target")}
    return preview, schedule_meta(plan, r.steps, r.guidance, experts)


def _clip_meta(cfg: VideoPairsConfig, clip: Clip, backend: str) -> dict:
    """A video pair's metadata: its source video, clip and sizes (the preview's own detail comes beside)."""
    i, b = clip.info, clip.bucket
    return {
        "source": "video",
        "preview_mode": cfg.mode,
        "prompt": clip.video.caption or cfg.prompt,
        "caption": clip.video.caption,
        "seed": cfg.seed,
        "version": __version__,
        "base": base_meta(cfg.base),
        "video": {
            "id": clip.video.id,
            "path": str(clip.video.path),
            "backend": backend,
            "fps": i.fps,
            "frames": i.frames,
            "size": [i.height, i.width],
            "clip": clip.index,
            "first_frame": clip.indices[0],
            "last_frame": clip.indices[-1],
            "crop": list(clip.box),
        },
        "fps": cfg.fps,
        "target_size": [cfg.frames, b.height, b.width],
        "preview_size": [cfg.frames, b.preview_height, b.preview_width],
        "dtype": cfg.dtype,
    }


def demo_videos(directory: Path, n: int) -> str:
    """Synthetic mp4s of several sizes and frame rates (written once) for the no-argument demo."""
    shapes = [(48, 96, 160, 24), (40, 160, 96, 30), (36, 128, 128, 25), (30, 75, 131, 24)]
    for i in range(n):
        f, h, w, fps = shapes[i % len(shapes)]
        path = directory / f"demo_{i:03d}.mp4"
        if not path.exists():
            write_synthetic_video(path, f, h, w, fps, seed=i)
    log.info("videos=null: using %d synthetic demo videos in %s", n, directory)
    return str(directory)


def _samples(model: BaseModel, cfg: VideoPairsConfig, todo: list[Clip], failed: list[str]) -> Iterator:
    """(key, tensors, metadata) for the clips to make, reading each video once in clip order."""
    conds: dict[str, object] = {}
    by_video: dict[str, list[Clip]] = {}
    for c in todo:
        by_video.setdefault(c.video.id, []).append(c)
    for clips in by_video.values():
        try:
            video = Video(clips[0].video.path, cfg.backend)
        except VideoError as e:
            failed += [c.key for c in clips]
            log.warning("skipped %d clip(s) of %s: %s", len(clips), clips[0].video.id, e)
            continue
        with video:
            for c in clips:
                try:
                    frames = video.read(c.indices)
                except VideoError as e:
                    failed.append(c.key)
                    log.warning(
                        "skipped clip %d of %s (frames %d-%d): %s", c.index, c.video.id, c.indices[0], c.indices[-1], e
                    )
                    continue
                prompt = c.video.caption or cfg.prompt
                if prompt not in conds:
                    conds = conds if len(conds) < 64 else {}
                    conds[prompt] = model.encode_prompt([prompt])
                yield (c.key, *clip_pair(model, cfg, c, frames, video.backend, conds[prompt]))


def make_video_pairs(cfg: VideoPairsConfig) -> dict:
    """Write this rank's share of the video pairs; returns the run summary."""
    cfg = cfg.resolved()
    rank, world = rank_world()
    with OutDirLock(cfg.out_dir, rank):  # one process per (out_dir, rank), demo videos included
        return _make_video_pairs(cfg, rank, world)


def _make_video_pairs(cfg: VideoPairsConfig, rank: int, world: int) -> dict:
    out = Path(cfg.out_dir)
    spec = cfg.videos if cfg.videos is not None else demo_videos(out / "demo_videos", cfg.demo_videos)
    videos = list_videos(spec, cfg.caption_column)
    done = open_out_dir(out, cfg.fingerprint(), rank, PREFIX)
    mine = videos[rank::world]
    clips, skipped = _plan_clips(mine, cfg)
    if mine and not clips:  # every video this rank was given is unusable: say so instead of writing nothing
        raise ConfigError(
            f"videos={cfg.videos or 'demo'}: none of the {len(mine)} videos of rank {rank} gives a clip "
            f"({_reasons(skipped)}; the warnings above name each one)"
        )
    todo = [c for c in clips if c.key not in done]
    log.info(
        "rank %d/%d: %d videos assigned, %d skipped (%s), %d clips, %d already done, %d to make in %s",
        rank,
        world,
        len(mine),
        sum(skipped.values()),
        _reasons(skipped),
        len(clips),
        len(clips) - len(todo),
        len(todo),
        out,
    )

    model = load_base_model(cfg.base, cfg.device) if todo else None
    if model is not None and cfg.mode == "repreview":
        _check_repreview_grids(model, cfg, todo)
    failed: list[str] = []
    summary = write_samples(
        out,
        rank,
        world,
        _samples(model, cfg, todo, failed),
        len(todo),
        len(clips) - len(todo),
        cfg.shard_size,
        PREFIX,
        cfg.progress,
    )
    summary.update(videos=len(mine), videos_skipped=dict(skipped), clips=len(clips), clips_failed=len(failed))
    log.info(
        "rank %d: %d videos, %d skipped (%s); %d clips, %d failed to decode",
        rank,
        len(mine),
        sum(skipped.values()),
        _reasons(skipped),
        len(clips),
        len(failed),
    )
    return summary


def _plan_clips(videos: list, cfg: VideoPairsConfig) -> tuple[list[Clip], Counter]:
    """The clips of these videos, and how many videos were skipped for each reason (one warning each)."""
    clips: list[Clip] = []
    skipped = Counter({r: 0 for r in SKIP_REASONS})
    for v in videos:
        try:
            with Video(v.path, cfg.backend) as video:
                info = video.info
        except VideoError as e:
            skipped["unreadable"] += 1
            log.warning("skipped video %s: unreadable (%s)", v.id, e)
            continue
        planned, reason, why = plan_video(v, info, cfg)
        if reason:
            skipped[reason] += 1
            log.warning("skipped video %s: %s (%s)", v.id, reason.replace("_", " "), why)
        clips += planned
    return clips, skipped


def _check_repreview_grids(model: BaseModel, cfg: VideoPairsConfig, todo: list[Clip]) -> None:
    """Re-previewing runs the transformer at each bucket's preview size (and, off `pool`, at its target size)."""
    s, lat_f = cfg.base.stride_s, latent_frames(cfg.frames, cfg.base.stride_t)
    for b in {c.bucket for c in todo}:
        model.check_grid((b.preview_height // s, b.preview_width // s), lat_f)
        if cfg.repreview.rule != "pool" and cfg.repreview.switch < cfg.repreview.steps:
            model.check_grid((b.height // s, b.width // s), lat_f)  # v at the switch, at the target size


def _reasons(skipped: Counter) -> str:
    return ", ".join(f"{skipped[r]} {r.replace('_', ' ')}" for r in SKIP_REASONS)
