"""Preview/target pair generation with a frozen base model (the engine behind data_prep/make_pairs.py).

For each (prompt, seed) the first `switch` steps run once at the target resolution; then branch A
finishes there (the target) and branch B reshifts to the preview size and finishes there (the preview).
Ranks take disjoint slices; completed samples are found in complete shards, so a rerun resumes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from surf_train import __version__
from surf_train.base import BaseModel, BaseSpec, load_base_model
from surf_train.dist_env import rank_world
from surf_train.errors import ConfigError
from surf_train.sampling import DOWN_MODES, RULES, PreviewPlan, pair_sample
from surf_train.shards import (ShardWriter, encode_sample, list_shards, next_index, remove_partial,
                               shard_keys)

log = logging.getLogger(__name__)

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FINGERPRINT = "pairs_config.json"
BUILTIN_PROMPTS = [
    "a cat playing piano in a sunny room", "a video of waves on the beach at sunset",
    "a red ball rolling across a wooden floor", "city street at night with neon lights",
    "a bird flying over a mountain lake", "a dog running through tall grass",
    "rain falling on a window, close-up", "a sailing boat on a calm sea at dawn",
    "a chef chopping vegetables in a kitchen", "snow falling in a pine forest",
    "a hot air balloon rising over fields", "a train passing through a green valley",
    "fireworks over a river at night", "a child blowing soap bubbles in a park",
    "clouds moving over a desert canyon", "a jellyfish drifting in blue water",
]


@dataclass
class PairsConfig:
    """Settings of one make_pairs run (the Hydra config, minus Hydra)."""
    base: BaseSpec
    out_dir: str = "data/pairs"
    num_pairs: int | None = 32  # None: one pair per prompt entry
    prompts: str | None = None  # .txt (one per line) or .jsonl ({"prompt": ..., "seed": ...}); None: built-in
    height: int | None = None  # target size in pixels; None: the base model's native size
    width: int | None = None
    frames: int | None = None
    preview_height: int | None = None  # None: half the target
    preview_width: int | None = None
    steps: int = 20
    switch: int = 5
    shift: float | None = None  # None: the base model's default
    guidance: float | None = None
    rule: str = "paper"
    down: str = "area"
    seed: int = 0
    dtype: str = "float16"  # storage dtype of the latents
    store_text: bool = True
    shard_size: int = 8
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "PairsConfig":
        d = dict(d)
        base = d.pop("base")
        base = BaseSpec.from_name(base) if isinstance(base, str) else BaseSpec.from_dict(base)
        known = {f.name for f in fields(cls)} - {"base"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"make_pairs: unknown settings {unknown}")
        return cls(base=base, **d)

    def resolved(self) -> "PairsConfig":
        """A copy with every None default filled in from the base model, validated."""
        b = self.base
        c = PairsConfig(**{**asdict(self), "base": b})
        c.height = c.height or b.native_size[0]
        c.width = c.width or b.native_size[1]
        c.frames = c.frames or b.native_frames
        c.preview_height = c.preview_height or c.height // 2
        c.preview_width = c.preview_width or c.width // 2
        c.shift = b.shift if c.shift is None else c.shift
        c.guidance = b.guidance if c.guidance is None else c.guidance
        c.validate()
        return c

    def validate(self) -> None:
        g = self.base.geometry
        g.check(self.frames, self.height, self.width, "target")
        g.check(None, self.preview_height, self.preview_width, "preview")
        if self.preview_height > self.height or self.preview_width > self.width:
            raise ConfigError(f"preview {self.preview_height}x{self.preview_width} is larger than target "
                              f"{self.height}x{self.width}")
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be >= 1")
        if not 0 <= self.switch <= self.steps:
            raise ConfigError(f"switch={self.switch} must be in [0, steps={self.steps}]")
        if self.rule not in RULES:
            raise ConfigError(f"rule={self.rule!r} must be one of {RULES}")
        if self.down not in DOWN_MODES:
            raise ConfigError(f"down={self.down!r} must be one of {DOWN_MODES}")
        if self.dtype not in STORE_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} must be one of {list(STORE_DTYPES)}")
        if self.num_pairs is not None and self.num_pairs < 1:
            raise ConfigError(f"num_pairs={self.num_pairs} must be >= 1 (or null: one per prompt)")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size={self.shard_size} must be >= 1")

    def plan(self) -> PreviewPlan:
        s = self.base.stride_s
        return PreviewPlan(steps=self.steps, switch=self.switch, shift=self.shift, rule=self.rule, down=self.down,
                           preview_size=(self.preview_height // s, self.preview_width // s))

    def fingerprint(self) -> dict:
        """Everything that changes the content of a pair; a rerun must match it to append."""
        b = self.base
        return {"base": b.model_id, "revision": b.revision, "negative_prompt": b.negative_prompt,
                "max_sequence_length": b.max_sequence_length, "model_dtype": b.dtype,
                **{k: getattr(self, k) for k in ("height", "width", "frames", "preview_height", "preview_width",
                                                 "steps", "switch", "shift", "guidance", "rule", "down",
                                                 "dtype", "store_text")}}


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        # content-addressed: stable across prompt-file edits and world-size changes
        return hashlib.sha1(f"{self.seed}\0{self.prompt}".encode()).hexdigest()[:16]


def read_prompts(path: str | None) -> list[tuple[str, int | None]]:
    """(prompt, seed or None) entries from a .txt or .jsonl file, or the built-in list."""
    if path is None:
        return [(p, None) for p in BUILTIN_PROMPTS]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts file not found: {p.resolve()}")
    entries = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
                prompt, seed = rec["prompt"], rec.get("seed")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{p}:{n}: expected a JSON object with a 'prompt' field ({e})") from None
            if not isinstance(prompt, str) or not (seed is None or isinstance(seed, int)):
                raise ConfigError(f"{p}:{n}: 'prompt' must be a string and 'seed' an integer")
            entries.append((prompt, seed))
        else:
            entries.append((line.strip(), None))
    if not entries:
        raise ConfigError(f"prompts file is empty: {p}")
    return entries


def make_jobs(entries: list[tuple[str, int | None]], num_pairs: int | None, seed: int) -> list[Job]:
    """Job n uses entry n mod P; seeds are the entry's own (plus the repeat index) or seed + n."""
    n_total = len(entries) if num_pairs is None else num_pairs
    jobs, seen = [], set()
    for n in range(n_total):
        prompt, own = entries[n % len(entries)]
        job = Job(prompt, own + n // len(entries) if own is not None else seed + n)
        if job.key not in seen:
            seen.add(job.key)
            jobs.append(job)
    return jobs


def check_fingerprint(out_dir: Path, fp: dict) -> None:
    """Refuse to mix configurations in one directory; record the configuration on first use."""
    path = out_dir / FINGERPRINT
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {fp.get(k)!r}" for k in diff)
            raise ConfigError(f"{out_dir} holds shards of a different configuration ({detail}); "
                              f"use another out_dir")
        return
    if list_shards(out_dir):
        raise ConfigError(f"{out_dir} holds shards but no {FINGERPRINT}; use another out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{FINGERPRINT}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(fp, indent=1, sort_keys=True))
    os.replace(tmp, path)  # ranks racing here write identical content


def generate_pair(model: BaseModel, cfg: PairsConfig, job: Job) -> tuple[dict, dict]:
    """One (preview, target) pair -> (tensors, metadata) for the shard schema."""
    plan = cfg.plan()
    shape = model.geometry.latent_shape(cfg.frames, cfg.height, cfg.width)  # (C, F, H, W)
    gen = torch.Generator().manual_seed(job.seed)
    noise = torch.randn((1, *shape), generator=gen)  # (1, C, F, H, W)
    fresh = torch.randn((1, *shape[:2], *plan.preview_size), generator=gen)  # (1, C, F, h, w)
    cond = model.encode_prompt([job.prompt])
    preview, target = pair_sample(model.velocity_fn(cond, cfg.guidance), noise.to(model.device), plan,
                                  fresh.to(model.device))
    dt = STORE_DTYPES[cfg.dtype]
    tensors = {"preview": preview[0].to(dt), "target": target[0].to(dt)}
    if cfg.store_text:
        tensors["text"] = cond.embeds[0].to(dt)  # (L, D), zero-padded to max_sequence_length
    s_k = float(plan.sigmas[plan.switch])
    meta = {"source": "generated", "prompt": job.prompt, "seed": job.seed, "version": __version__,
            "base": {"name": cfg.base.name, "id": cfg.base.model_id, "revision": cfg.base.revision,
                     "family": cfg.base.family},
            "target_size": [cfg.frames, cfg.height, cfg.width],
            "preview_size": [cfg.frames, cfg.preview_height, cfg.preview_width],
            "schedule": {"steps": cfg.steps, "shift": cfg.shift, "guidance": cfg.guidance},
            "reshift": {"switch": cfg.switch, "sigma_switch": s_k, "rule": cfg.rule, "down": cfg.down},
            "dtype": cfg.dtype}
    return tensors, meta


def make_pairs(cfg: PairsConfig) -> dict:
    """Write this rank's share of the pairs; returns the run summary."""
    cfg = cfg.resolved()
    rank, world = rank_world()
    out = Path(cfg.out_dir)
    entries = read_prompts(cfg.prompts)
    check_fingerprint(out, cfg.fingerprint())
    removed = remove_partial(out, rank)
    if removed:
        log.info("rank %d: removed %d incomplete shard(s) left by an earlier run", rank, removed)
    done = set()
    for shard in list_shards(out):
        done.update(shard_keys(shard))
    jobs = make_jobs(entries, cfg.num_pairs, cfg.seed)
    mine = [j for i, j in enumerate(jobs) if i % world == rank]
    todo = [j for j in mine if j.key not in done]
    log.info("rank %d/%d: %d pairs assigned, %d already done, %d to make in %s",
             rank, world, len(mine), len(mine) - len(todo), len(todo), out)

    model = load_base_model(cfg.base, cfg.device) if todo else None
    if model is not None:
        s = cfg.base.stride_s
        model.check_grid((cfg.height // s, cfg.width // s), (cfg.frames - 1) // cfg.base.stride_t + 1)
    t0 = time.perf_counter()
    with ShardWriter(out, rank, cfg.shard_size, start_index=next_index(out, rank)) as writer:
        for job in tqdm(todo, desc=f"pairs r{rank}", disable=not cfg.progress, unit="pair"):
            tensors, meta = generate_pair(model, cfg, job)
            writer.write(encode_sample(job.key, tensors, meta))
    dt = time.perf_counter() - t0
    summary = {"rank": rank, "world_size": world, "pairs": len(todo), "skipped": len(mine) - len(todo),
               "seconds": round(dt, 3), "pairs_per_s": round(len(todo) / dt, 3) if todo and dt > 0 else 0.0,
               "bytes": writer.bytes, "shards": writer.shards, "out_dir": str(out)}
    log.info("rank %d: wrote %d pairs (%d skipped) in %.1fs, %.2f pairs/s, %d shards, %.2f MB -> %s",
             rank, summary["pairs"], summary["skipped"], dt, summary["pairs_per_s"], summary["shards"],
             summary["bytes"] / 1e6, out)
    return summary
