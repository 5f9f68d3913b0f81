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
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from tqdm import tqdm

from surf_train import __version__
from surf_train.base import Acceleration, BaseModel, BaseSpec, adapter_class, latent_frames, load_base_model
from surf_train.base.sampling import DOWN_MODES, RULES, DownMode, PreviewPlan, Rule, pair_sample
from surf_train.common.config import check, schema
from surf_train.common.dist_env import rank_world
from surf_train.common.dtypes import DTYPES, DType
from surf_train.common.errors import ConfigError, known_keys
from surf_train.data.meta import base_fingerprint, base_meta, expert_meta, preview_kind, schedule_meta
from surf_train.data.shards import (
    OutDirLock,
    ShardWriter,
    encode_sample,
    list_shards,
    next_index,
    remove_partial,
    shard_keys,
)

log = logging.getLogger(__name__)

FINGERPRINT = "pairs_config.json"
BUILTIN_PROMPTS = [
    "a cat playing piano in a sunny room",
    "a video of waves on the beach at sunset",
    "a red ball rolling across a wooden floor",
    "city street at night with neon lights",
    "a bird flying over a mountain lake",
    "a dog running through tall grass",
    "rain falling on a window, close-up",
    "a sailing boat on a calm sea at dawn",
    "a chef chopping vegetables in a kitchen",
    "snow falling in a pine forest",
    "a hot air balloon rising over fields",
    "a train passing through a green valley",
    "fireworks over a river at night",
    "a child blowing soap bubbles in a park",
    "clouds moving over a desert canyon",
    "a jellyfish drifting in blue water",
]


def settings(cls, d: dict, what: str) -> dict:
    """A config dataclass's keyword arguments from a plain dict: `base` by name or as a dict; unknown keys refused."""
    d = known_keys(d, cls, what)
    base = d.pop("base")
    return {"base": BaseSpec.from_name(base) if isinstance(base, str) else BaseSpec.from_dict(base), **d}


def check_schedule(steps: int, switch: int, rule: str, down: str, where: str = "") -> None:
    """The base model's sampling schedule and re-noise settings (`where`: key prefix in messages)."""
    if steps < 1:
        raise ConfigError(f"{where}steps={steps} must be >= 1")
    if not 0 <= switch <= steps:
        raise ConfigError(f"{where}switch={switch} must be in [0, steps={steps}]")
    if rule not in RULES:
        raise ConfigError(f"{where}rule={rule!r} must be one of {RULES}")
    if down not in DOWN_MODES:
        raise ConfigError(f"{where}down={down!r} must be one of {DOWN_MODES}")


def check_storage(dtype: str, shard_size: int) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {list(DTYPES)}")
    if shard_size < 1:
        raise ConfigError(f"shard_size={shard_size} must be >= 1")


@dataclass
class PairsConfig:
    """Settings of one make_pairs run (the Hydra config, minus Hydra)."""

    base: BaseSpec
    out_dir: str = "data/pairs"  # shards + pairs_config.json; a rerun resumes, another config is refused
    num_pairs: int | None = 128  # None: one pair per prompt entry
    prompts: str | None = None  # .txt (one per line) or .jsonl ({"prompt": ..., "seed": ...}); None: built-in
    height: int | None = None  # target size in pixels; None: the base model's native size
    width: int | None = None
    frames: int | None = None
    preview_height: int | None = None  # None: half the target
    preview_width: int | None = None
    steps: int = 20  # base-model sampling steps
    switch: int = 5  # steps shared at target resolution before the switch to preview size
    shift: float | None = None  # None: the base model's (its pipeline scheduler's, unless its yaml overrides it)
    guidance: float | None = None  # CFG scale (Wan) or embedded guidance (HunyuanVideo); None: the base model's
    rule: Rule = "pool"  # re-noise rule at the switch; pool: closest previews, measured (README)
    down: DownMode = "area"  # latent downsampling kernel
    cache_threshold: float | None = None  # acceleration plug-ins on the base model (base.Acceleration)
    cfg_stop: int | None = None  # no CFG from this base-model step on; None: CFG at every step
    cfg_low: bool = True  # false: no CFG in the preview branch's low-resolution steps
    seed: int = 0  # seed of pair n is seed + n unless the jsonl entry gives one
    dtype: DType = "float16"  # storage dtype of the latents
    store_text: bool = True  # store the prompt's text embeddings for a text-conditioned Refiner
    shard_size: int = 8  # samples per shard
    batch_size: int = 8  # pairs sampled together (speed only: not part of the fingerprint)
    device: str = "auto"  # auto: cuda if available
    progress: bool = True

    def __post_init__(self):
        check(self)

    @classmethod
    def from_dict(cls, d: dict) -> PairsConfig:
        return cls(**settings(cls, d, "make_pairs"))

    def resolved(self) -> PairsConfig:
        """A copy with every None default filled in from the base model, validated."""
        b = self.base
        c = PairsConfig(**{**asdict(self), "base": b})
        c.height = c.height or b.native_size[0]
        c.width = c.width or b.native_size[1]
        c.frames = c.frames or b.native_frames
        c.preview_height = c.preview_height or c.height // 2
        c.preview_width = c.preview_width or c.width // 2
        c.shift = b.shift if c.shift is None else c.shift  # None: the scheduler's own, recorded as such
        c.guidance = b.guidance if c.guidance is None else c.guidance
        c.validate()
        return c

    def validate(self) -> None:
        g = self.base.geometry
        g.check(self.frames, self.height, self.width, "target")
        g.check(None, self.preview_height, self.preview_width, "preview")
        if self.preview_height > self.height or self.preview_width > self.width:
            raise ConfigError(
                f"preview {self.preview_height}x{self.preview_width} is larger than target {self.height}x{self.width}"
            )
        check_schedule(self.steps, self.switch, self.rule, self.down)
        check_storage(self.dtype, self.shard_size)
        self.acceleration().check(adapter_class(self.base.family).cfg_branch)  # embedded guidance: nothing to cut
        if self.num_pairs is not None and self.num_pairs < 1:
            raise ConfigError(f"num_pairs={self.num_pairs} must be >= 1 (or null: one per prompt)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")

    def plan(self, model: BaseModel) -> PreviewPlan:
        """The run's noise-reshifting plan on the base model's own scheduler."""
        s = self.base.stride_s
        return PreviewPlan(
            model.schedule(self.steps, self.shift),
            switch=self.switch,
            rule=self.rule,
            down=self.down,
            preview_size=(self.preview_height // s, self.preview_width // s),
        )

    def acceleration(self) -> Acceleration:
        return Acceleration(self.cache_threshold, self.cfg_stop, self.cfg_low)

    def fingerprint(self) -> dict:
        """Everything that changes the content of a pair; a rerun must match it to append."""
        return {
            **base_fingerprint(self.base),
            **{
                k: getattr(self, k)
                for k in (
                    "height",
                    "width",
                    "frames",
                    "preview_height",
                    "preview_width",
                    "steps",
                    "switch",
                    "shift",
                    "guidance",
                    "rule",
                    "down",
                    "dtype",
                    "store_text",
                )
            },
            **({"acceleration": asdict(self.acceleration())} if self.acceleration() != Acceleration() else {}),
        }


# the settings dataclass gives every default; conf/make_pairs.yaml extends this schema (Hydra resolves it by name)
ConfigStore.instance().store(name="make_pairs_schema", node=schema(PairsConfig))


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        # content-addressed: stable across prompt-file edits and world-size changes
        return hashlib.sha1(f"{self.seed}\0{self.prompt}".encode()).hexdigest()[:16]


def builtin_prompts(base: BaseSpec | None = None) -> list[str]:
    """The prompts used when none are given: the toy world's caption grammar for a base model trained on
    it (`prompts: toyworld` in its yaml), else a fixed list of 16 everyday scenes."""
    if base is not None and base.prompts == "toyworld":
        from surf_train.data.toyworld import all_captions

        return all_captions()
    return list(BUILTIN_PROMPTS)


def read_prompts(path: str | None, base: BaseSpec | None = None) -> list[tuple[str, int | None]]:
    """(prompt, seed or None) entries from a .txt or .jsonl file, or the base model's built-in list."""
    if path is None:
        return [(p, None) for p in builtin_prompts(base)]
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
            raise ConfigError(f"{out_dir} holds shards of a different configuration ({detail}); use another out_dir")
        return
    if list_shards(out_dir):
        raise ConfigError(f"{out_dir} holds shards but no {FINGERPRINT}; use another out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{FINGERPRINT}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(fp, indent=1, sort_keys=True))
    os.replace(tmp, path)  # ranks racing here write identical content


def generate_pairs(model: BaseModel, cfg: PairsConfig, jobs: list[Job]) -> list[tuple[dict, dict]]:
    """(preview, target) pairs for a batch of jobs -> [(tensors, metadata)] for the shard schema.

    Each job's noise comes from its own generator seeded by its seed, so a pair does not depend on the
    batch it was made in (up to float rounding of batched matmuls).
    """
    plan = cfg.plan(model)
    shape = model.geometry.latent_shape(cfg.frames, cfg.height, cfg.width)  # (C, F, H, W)
    noise, fresh = [], []
    for job in jobs:
        gen = torch.Generator().manual_seed(job.seed)
        noise.append(torch.randn((1, *shape), generator=gen))  # (1, C, F, H, W)
        fresh.append(torch.randn((1, *shape[:2], *plan.preview_size), generator=gen))  # (1, C, F, h, w)
    cond = model.encode_prompt([job.prompt for job in jobs])
    vel = model.velocity_fn(cond, cfg.guidance, cfg.acceleration())
    previews, targets = pair_sample(vel, torch.cat(noise).to(model.device), plan, torch.cat(fresh).to(model.device))
    dt = DTYPES[cfg.dtype]
    out = []
    for i, job in enumerate(jobs):
        tensors = {"preview": previews[i].to(dt), "target": targets[i].to(dt)}
        if cfg.store_text:
            tensors["text"] = cond.text(i).to(dt)  # (L, D) zero-padded; stored at its real length
        meta = {
            "source": "generated",
            "prompt": job.prompt,
            "seed": job.seed,
            "version": __version__,
            "base": base_meta(cfg.base),
            "target_size": [cfg.frames, cfg.height, cfg.width],
            "preview_size": [cfg.frames, cfg.preview_height, cfg.preview_width],
            **schedule_meta(plan, cfg.steps, cfg.guidance, expert_meta(model, plan, shape[-2:], cfg.guidance)),
            "dtype": cfg.dtype,
        }
        meta["preview_kind"] = preview_kind(meta)  # exact at switch = steps (the target pooled), else generated
        out.append((tensors, meta))
    return out


def out_dir_arg_error(argv: list[str]) -> str | None:
    """One error line when an `out_dir=` override names an existing file, else None: the command line is
    checked before Hydra starts, which would fail first (a traceback) making its log directory inside it."""
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("out_dir=")]
    if given and os.path.exists(given[-1]) and not os.path.isdir(given[-1]):
        return f"out_dir={given[-1]} is an existing file, not a directory"
    return None


def open_out_dir(out: Path, fp: dict, rank: int, prefix: str = "pairs") -> set[str]:
    """Check the directory's configuration, drop this rank's partial shards; returns the keys already written.
    Call it holding the rank's `OutDirLock`."""
    check_fingerprint(out, fp)
    removed = remove_partial(out, rank, prefix)
    if removed:
        log.info("rank %d: removed %d incomplete shard(s) left by an earlier run", rank, removed)
    done = set()
    for shard in list_shards(out):
        done.update(shard_keys(shard))
    return done


def write_samples(
    out: Path,
    rank: int,
    world: int,
    samples: Iterable[tuple[str, dict, dict]],
    total: int,
    skipped: int,
    shard_size: int,
    prefix: str = "pairs",
    progress: bool = True,
) -> dict:
    """Write (key, tensors, metadata) samples into this rank's next shards; returns the run summary."""
    t0, n = time.perf_counter(), 0
    with ShardWriter(out, rank, shard_size, prefix=prefix, start_index=next_index(out, rank, prefix)) as writer:
        for key, tensors, meta in tqdm(
            samples, total=total, desc=f"{prefix} r{rank}", disable=not progress, unit="pair"
        ):
            writer.write(encode_sample(key, tensors, meta))
            n += 1
    dt = time.perf_counter() - t0
    summary = {
        "rank": rank,
        "world_size": world,
        "pairs": n,
        "skipped": skipped,
        "seconds": round(dt, 3),
        "pairs_per_s": round(n / dt, 3) if n and dt > 0 else 0.0,
        "bytes": writer.bytes,
        "shards": writer.shards,
        "out_dir": str(out),
    }
    log.info(
        "rank %d: wrote %d pairs (%d skipped) in %.1fs, %.2f pairs/s, %d shards, %.2f MB -> %s",
        rank,
        n,
        skipped,
        dt,
        summary["pairs_per_s"],
        summary["shards"],
        summary["bytes"] / 1e6,
        out,
    )
    return summary


def make_pairs(cfg: PairsConfig) -> dict:
    """Write this rank's share of the pairs; returns the run summary."""
    cfg = cfg.resolved()
    rank, world = rank_world()
    with OutDirLock(cfg.out_dir, rank):  # one process per (out_dir, rank): a double launch is refused
        return _make_pairs(cfg, rank, world)


def _make_pairs(cfg: PairsConfig, rank: int, world: int) -> dict:
    out = Path(cfg.out_dir)
    entries = read_prompts(cfg.prompts, cfg.base)
    done = open_out_dir(out, cfg.fingerprint(), rank)
    jobs = make_jobs(entries, cfg.num_pairs, cfg.seed)
    mine = [j for i, j in enumerate(jobs) if i % world == rank]
    todo = [j for j in mine if j.key not in done]
    log.info(
        "rank %d/%d: %d pairs assigned, %d already done, %d to make in %s",
        rank,
        world,
        len(mine),
        len(mine) - len(todo),
        len(todo),
        out,
    )

    model = load_base_model(cfg.base, cfg.device) if todo else None
    if model is not None:
        s = cfg.base.stride_s
        model.check_grid((cfg.height // s, cfg.width // s), latent_frames(cfg.frames, cfg.base.stride_t))
        model.accelerate(cfg.acceleration())
    batches = (todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size))
    samples = ((job.key, *pair) for jobs in batches for job, pair in zip(jobs, generate_pairs(model, cfg, jobs)))
    summary = write_samples(
        out, rank, world, samples, len(todo), len(mine) - len(todo), cfg.shard_size, progress=cfg.progress
    )
    if model is not None:  # the work the base model actually did (acceleration plug-ins skip some of it)
        summary["forwards"] = sum(model.meter.forwards.values())
        summary["blocks_run"] = round(model.meter.block_fraction(None, model.block_lists), 4)
    return summary
