"""Training and validation data from (preview, target) pair shards (schema: surf_train.shards).

Training is an endless stream of shards drawn with replacement, cut to the same number of batches per
epoch on every rank: uneven per-rank sample counts hang DDP (DESIGN 5). Validation is a fixed set
held in memory. Entries are decoded by `decode_sample` only, so nothing in a shard is unpickled.
"""
from __future__ import annotations

import glob
import logging
import multiprocessing
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import lightning.pytorch as pl
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from surf_train.errors import ConfigError
from surf_train.shards import ShardError, decode_sample, list_shards, raise_named, shard_keys

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Data settings (the Hydra `data` group builds this)."""

    shards: str | list[str] = "data/pairs"  # directory, glob or brace pattern (or a list of them)
    val_shards: str | list[str] | None = None  # None: hold out the last `val_holdout` shards of `shards`
    val_holdout: int = 1
    val_samples: int = 8  # first samples of the validation shards in key order; 0: no validation
    batch_size: int = 4
    num_workers: int = 0
    samples_per_epoch: int | None = None  # per rank; None: training samples // world size
    crop_frames: int | None = None  # temporal crop in latent frames (same window for preview and target)
    skip_corrupt: bool = False  # False: a corrupt shard raises ShardError; True: warn, count and skip it
    seed: int = 0
    shuffle_buffer: int = 64  # samples per worker; <= 1: no shuffling
    text: bool = True  # keep text embeddings when the shards have them

    def __post_init__(self):
        for name, low in (("val_holdout", 0), ("val_samples", 0), ("batch_size", 1), ("num_workers", 0),
                          ("shuffle_buffer", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"data.{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("samples_per_epoch", "crop_frames"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1 or None, got {getattr(self, name)}")


def resolve_shards(spec: str | Sequence[str]) -> list[Path]:
    """Complete shard files (`*.tar`) named by a directory, a glob or a brace pattern, sorted."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    found: set[Path] = set()
    for s in map(str, specs):
        if Path(s).is_dir():
            found.update(list_shards(s))
            continue
        names = [n for pattern in braceexpand(s) for n in (glob.glob(pattern) if _magic(pattern) else [pattern])]
        missing = [n for n in names if not Path(n).is_file()]
        if missing and len(missing) < len(names):
            raise ConfigError(f"data.shards {s!r}: {len(missing)} listed shard(s) do not exist, e.g. {missing[0]}")
        found.update(Path(n) for n in names if n.endswith(".tar") and Path(n).is_file())
    return sorted(found)


def _magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def split_shards(cfg: DataConfig) -> tuple[list[Path], list[Path]]:
    """(training shards, validation shards) as the config asks; ConfigError when training gets none."""
    shards = resolve_shards(cfg.shards)
    if not shards:
        raise ConfigError(f"no shards (*.tar) match data.shards={cfg.shards!r}")
    if cfg.val_shards is not None:
        val = resolve_shards(cfg.val_shards)
        if not val and cfg.val_samples:
            raise ConfigError(f"no shards (*.tar) match data.val_shards={cfg.val_shards!r}")
        train = [p for p in shards if p not in set(val)]
    else:
        k = cfg.val_holdout if cfg.val_samples else 0
        train, val = shards[:len(shards) - k], shards[len(shards) - k:]
    if not train:
        raise ConfigError(f"holding out {len(val)} validation shard(s) leaves no training shards among the "
                          f"{len(shards)} matching {cfg.shards!r}; lower data.val_holdout or set data.val_shards")
    return train, val


def collate(samples: Sequence[dict]) -> dict:
    """Samples of one shape -> {"preview": (B,C,F,h,w), "target": (B,C,F,H,W), ["text": (B,L,D)], "keys", "meta"}."""
    batch = {name: torch.stack([s[name] for s in samples]).float() for name in ("preview", "target", "text")
             if name in samples[0]}
    batch["keys"] = [s["key"] for s in samples]
    batch["meta"] = [s["meta"] for s in samples]
    return batch


def shape_key(sample: dict) -> tuple:
    """What a batch must share: the tensor shapes (text shape or None)."""
    return tuple(tuple(sample[n].shape) if n in sample else None for n in ("preview", "target", "text"))


def group_batches(samples: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Collated batches of `batch_size` samples of equal shape; incomplete buckets are dropped at the end."""
    buckets: dict[tuple, list[dict]] = {}
    for s in samples:
        bucket = buckets.setdefault(shape_key(s), [])
        bucket.append(s)
        if len(bucket) == batch_size:
            yield collate(bucket)
            buckets[shape_key(s)] = []


def crop(sample: dict, frames: int, start: int) -> dict:
    """Frames [start, start + frames) of preview and target (axis 1 of (C, F, h, w)); text unchanged."""
    out = {**sample, "meta": {**sample["meta"], "crop": [start, start + frames]}}
    for name in ("preview", "target"):
        out[name] = sample[name][:, start:start + frames]
    return out


def prepare(raw: dict, keep_text: bool = True) -> dict:
    """decode_sample plus the checks the training loop relies on."""
    s = decode_sample(raw)
    if s["preview"].ndim != 4 or s["target"].ndim != 4 or s["preview"].shape[:2] != s["target"].shape[:2]:
        raise ShardError(f"{raw.get('__url__', '?')}: sample {s['key']}: preview {tuple(s['preview'].shape)} and "
                         f"target {tuple(s['target'].shape)} must be (C, F, h, w) and (C, F, H, W)")
    if not keep_text:
        s.pop("text", None)
    return s


class _Stream:
    """Per-worker state of the training stream: seeds, the current epoch, shards found corrupt."""

    def __init__(self, urls: list[str], seed: int, rank: int, skipped, skip: bool):
        self.urls, self.seed, self.rank, self.skipped, self.skip = urls, seed, rank, skipped, skip
        self.epoch = 0
        self.bad: set[str] = set()  # shards that failed here are not drawn again in this worker
        self.seen: set[str] = set()  # corrupt samples already reported by this worker
        self.since_good = 0  # shards drawn since the last sample decoded

    def rng(self, what: str) -> random.Random:
        """Generator seeded by (seed, rank, worker, epoch, what): ranks and workers draw different streams."""
        info = get_worker_info()
        return random.Random(f"{self.seed}/{self.rank}/{info.id if info else 0}/{self.epoch}/{what}")

    def _count(self) -> int:
        with self.skipped.get_lock():
            self.skipped.value += 1
            return self.skipped.value

    def on_shard_error(self, exn: Exception) -> bool:
        if not self.skip:
            return raise_named(exn)
        text = " ".join(str(a) for a in exn.args)
        url = next((u for u in self.urls if u in text), "?")
        self.bad.add(url)
        log.warning("skipped corrupt shard %s (%d skipped so far): %s: %s", url, self._count(),
                    type(exn).__name__, exn.args[0] if exn.args else "")
        return True

    def on_sample_error(self, exn: Exception) -> bool:
        if not self.skip:
            return raise_named(exn)
        if str(exn) not in self.seen:
            self.seen.add(str(exn))
            log.warning("skipped corrupt sample (%d skipped so far): %s", self._count(), exn)
        return True


class _Shards(IterableDataset):
    """Endless {"url"} draws with replacement from the training shards (seeded per rank, worker, epoch)."""

    def __init__(self, stream: _Stream):
        self.stream = stream

    def __iter__(self) -> Iterator[dict]:
        st, rng = self.stream, self.stream.rng("shards")
        limit, ok, nbad = 4 * len(st.urls) + 16, st.urls, 0
        while True:
            if len(st.bad) != nbad:
                ok, nbad = [u for u in st.urls if u not in st.bad], len(st.bad)
            if not ok:
                raise ShardError(f"all {len(st.urls)} training shards are corrupt, e.g. {st.urls[0]}")
            if st.since_good > limit:
                raise ShardError(f"no readable sample in the last {limit} shards drawn from {len(st.urls)} "
                                 f"training shards, e.g. {st.urls[0]}")
            st.since_good += 1
            yield {"url": rng.choice(ok)}


def _decoded(src: Iterable[dict], stream: _Stream, keep_text: bool) -> Iterator[dict]:
    for s in wds.map(partial(prepare, keep_text=keep_text), handler=stream.on_sample_error)(src):
        stream.since_good = 0
        yield s


def _cropped(src: Iterable[dict], stream: _Stream, frames: int) -> Iterator[dict]:
    rng = stream.rng("crop")
    for s in src:
        n = s["target"].shape[1]
        yield crop(s, frames, rng.randint(0, n - frames)) if n > frames else s


def _shuffled(src: Iterable[dict], stream: _Stream, bufsize: int) -> Iterator[dict]:
    return wds.filters.shuffle(bufsize, bufsize, rng=stream.rng("shuffle"))(src)


class _TrainLoader(wds.WebLoader):
    """WebLoader that tells the stream its epoch before the workers are started (they copy the stream)."""

    def __init__(self, dataset: wds.DataPipeline, stream: _Stream, epoch_fn, **kw):
        super().__init__(dataset, **kw)
        self.stream, self.epoch_fn = stream, epoch_fn

    def __iter__(self):
        self.stream.epoch = self.epoch_fn()
        return super().__iter__()


class _Batches(Dataset):
    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


class PairDataModule(pl.LightningDataModule):
    """Pair shards -> training stream (fixed steps per epoch on every rank) and a fixed validation set.

    `rank`/`world_size` override what the trainer or torch.distributed say (tests simulate ranks).
    """

    def __init__(self, cfg: DataConfig, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if (rank is None) != (world_size is None) or (rank is not None and not 0 <= rank < world_size):
            raise ValueError(f"give both rank and world_size with 0 <= rank < world_size, got {rank}, {world_size}")
        self.cfg, self._rank_world = cfg, (rank, world_size)
        self.train_shards: list[Path] = []
        self.val_shards: list[Path] = []
        self.train_samples: int | None = None  # from the tar indexes; None when samples_per_epoch is given
        self._skipped = multiprocessing.Value("q", 0)  # shared with DataLoader workers
        self._val: list[dict] | None = None
        self._epochs = 0
        self._ready = False

    @property
    def skipped(self) -> int:
        """Corrupt shards and samples skipped so far (all workers; with skip_corrupt)."""
        return self._skipped.value

    def rank_world(self) -> tuple[int, int]:
        if self._rank_world[0] is not None:
            return self._rank_world  # type: ignore[return-value]
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        train, self.val_shards = split_shards(self.cfg)
        if self.cfg.samples_per_epoch is None:  # count samples from the tar indexes, no decoding
            counts = {p: self._keys(p) for p in train}
            train = [p for p in train if counts[p] is not None]
            self.train_samples = sum(len(counts[p]) for p in train)
            if not train:
                raise ShardError(f"all {len(counts)} training shards are corrupt, e.g. {next(iter(counts))}")
        self.train_shards = train
        self._ready = True

    def _keys(self, path: Path) -> list[str] | None:
        try:
            return shard_keys(path)
        except ShardError as e:
            if not self.cfg.skip_corrupt:
                raise
            with self._skipped.get_lock():
                self._skipped.value += 1
            log.warning("skipped corrupt shard %s (%d skipped so far): %s", path, self.skipped, e)
            return None

    @property
    def samples_per_epoch(self) -> int:
        """Training samples per rank and epoch."""
        self.setup()
        if self.cfg.samples_per_epoch is not None:
            return self.cfg.samples_per_epoch
        return max(1, self.train_samples // self.rank_world()[1])

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per rank and epoch; the same on every rank."""
        return max(1, self.samples_per_epoch // self.cfg.batch_size)

    def _epoch(self) -> int:
        if self.trainer is not None:
            return self.trainer.current_epoch
        self._epochs += 1
        return self._epochs - 1

    def train_dataloader(self) -> wds.WebLoader:
        self.setup()
        cfg, (rank, _) = self.cfg, self.rank_world()
        stream = _Stream([str(p) for p in self.train_shards], cfg.seed, rank, self._skipped, cfg.skip_corrupt)
        stages = [_Shards(stream), wds.tarfile_to_samples(handler=stream.on_shard_error),
                  partial(_decoded, stream=stream, keep_text=cfg.text)]
        if cfg.crop_frames:
            stages.append(partial(_cropped, stream=stream, frames=cfg.crop_frames))
        if cfg.shuffle_buffer > 1:
            stages.append(partial(_shuffled, stream=stream, bufsize=cfg.shuffle_buffer))
        stages.append(partial(group_batches, batch_size=cfg.batch_size))
        loader = _TrainLoader(wds.DataPipeline(*stages), stream, self._epoch, batch_size=None,
                              num_workers=cfg.num_workers, persistent_workers=False)
        return loader.with_epoch(self.steps_per_epoch).with_length(self.steps_per_epoch, silent=True)

    def val_set(self) -> list[dict]:
        """The validation samples (first `val_samples` in key order), loaded once."""
        self.setup()
        if self._val is None:
            self._val = self._load_val()
        return self._val

    def _load_val(self) -> list[dict]:
        cfg = self.cfg
        if not cfg.val_samples or not self.val_shards:
            return []
        index = sorted((k, p) for p in self.val_shards for k in (self._keys(p) or []))[:cfg.val_samples]
        wanted = {k for k, _ in index}
        urls = sorted({str(p) for _, p in index})
        # the training stream's error handling, without resampling: shards in order, each read once
        stream = _Stream(urls, cfg.seed, 0, self._skipped, cfg.skip_corrupt)
        raw = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=stream.on_shard_error),
                               wds.select(lambda r: r["__key__"] in wanted),
                               wds.map(partial(prepare, keep_text=cfg.text), handler=stream.on_sample_error))
        got = {}
        for s in raw:
            n = s["target"].shape[1]  # the first window, so that validation is deterministic
            got[s["key"]] = crop(s, cfg.crop_frames, 0) if cfg.crop_frames and n > cfg.crop_frames else s
        return [got[k] for k, _ in index if k in got]

    def val_dataloader(self) -> DataLoader | list:
        """Pre-grouped batches of equal shape, in key order (Lightning adds a DistributedSampler under DDP)."""
        samples = self.val_set()
        if not samples:
            return []
        buckets: dict[tuple, list[dict]] = {}
        for s in samples:
            buckets.setdefault(shape_key(s), []).append(s)
        bs = self.cfg.batch_size
        batches = [collate(b[i:i + bs]) for b in buckets.values() for i in range(0, len(b), bs)]
        return DataLoader(_Batches(batches), batch_size=None, shuffle=False, num_workers=0)
