"""Training and validation data from (preview, target) pair shards (schema: surf_train.data.shards).

Training is an endless stream of shards drawn with replacement (surf_train.data.stream), cut to the same number
of batches per epoch on every rank: uneven per-rank sample counts hang DDP
(docs/architecture.md#facts-the-code-relies-on). Its position is saved in checkpoints, so a resume continues it
exactly (docs/training.md#what-a-resume-guarantees).
Validation is a fixed set held in memory. Entries are decoded by `decode_sample` only, so nothing in a shard is
unpickled.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, Dataset

from surf_train.common.config import check
from surf_train.common.errors import ConfigError
from surf_train.data.shards import ShardError, list_shards, shard_keys
from surf_train.data.stream import Corrupt, StatefulLoader, StreamDataset, StreamSpec, collate, crop, prepare, shape_key

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Data settings (the Hydra `data` group builds this)."""

    shards: str | list[str] | None = "data/pairs"  # directory, glob or brace pattern (or a list of them)
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
    # several pair directories mixed in training: {name: {"shards": ..., "weight": w}}; samples are drawn from
    # each source in proportion to its weight (whatever its size or shard size); replaces `shards`
    sources: dict[str, dict] | None = None

    def __post_init__(self):
        check(self, "data.")
        if self.sources is not None:
            if not isinstance(self.sources, Mapping) or not self.sources:
                raise ConfigError(
                    f"data.sources must be a non-empty mapping name -> {{shards, weight}}, got {self.sources!r}"
                )
            for name, src in self.sources.items():
                if not isinstance(src, Mapping) or "shards" not in src or set(src) - {"shards", "weight"}:
                    raise ConfigError(f"data.sources.{name}: expected {{shards: ..., weight: ...}}, got {src!r}")
                if not isinstance(src.get("weight", 1.0), (int, float)) or not src.get("weight", 1.0) > 0:
                    raise ConfigError(f"data.sources.{name}.weight must be a number > 0, got {src.get('weight')!r}")
        elif self.shards is None:
            raise ConfigError("give data.shards (one pair directory) or data.sources (several, with weights)")
        for name, low in (
            ("val_holdout", 0),
            ("val_samples", 0),
            ("batch_size", 1),
            ("num_workers", 0),
            ("shuffle_buffer", 0),
        ):
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


def split_shards(cfg: DataConfig) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """({source: training shards}, {source: validation shards}) as the config asks; `shards` is the source "".

    Without data.val_shards, the last `val_holdout` shards of every source are held out; validation shards
    given by data.val_shards belong to the source that matches them ("" if none).
    """
    specs = {name: src["shards"] for name, src in cfg.sources.items()} if cfg.sources else {"": cfg.shards}
    val_given = resolve_shards(cfg.val_shards) if cfg.val_shards is not None else None
    if val_given is not None and not val_given and cfg.val_samples:
        raise ConfigError(f"no shards (*.tar) match data.val_shards={cfg.val_shards!r}")
    train, val = {}, {}
    for name, spec in specs.items():
        what = f"data.sources.{name}.shards" if name else "data.shards"
        shards = resolve_shards(spec)
        if not shards:
            raise ConfigError(f"no shards (*.tar) match {what}={spec!r}")
        if val_given is not None:
            train[name] = [p for p in shards if p not in set(val_given)]
            val[name] = [p for p in shards if p in set(val_given)]
        else:
            k = cfg.val_holdout if cfg.val_samples else 0
            train[name], val[name] = shards[: len(shards) - k], shards[len(shards) - k :]
        if not train[name]:
            raise ConfigError(
                f"holding out {len(val[name])} validation shard(s) leaves no training shards among "
                f"the {len(shards)} matching {what}={spec!r}; lower data.val_holdout or set "
                f"data.val_shards"
            )
    if val_given is not None:
        matched = {p for ps in val.values() for p in ps}
        val[""] = val.get("", []) + [p for p in val_given if p not in matched]
    return train, val


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
        self.source_samples: dict[str, int] = {}  # training samples per source (mixed sources only)
        self.shard_weights: list[float] | None = None  # draw probability of each training shard (mixed sources)
        self.shard_source: dict[str, str] = {}  # shard url -> source name (mixed sources)
        self._skipped = multiprocessing.Value("q", 0)  # skips in the training stream, shared with DataLoader workers
        self._skipped_here = multiprocessing.Value("q", 0)  # skips at setup and in validation: the same on every rank
        self._val: list[dict] | None = None
        self._epochs = 0
        self._ready = False

    @property
    def skipped(self) -> int:
        """Skips of corrupt shards and samples so far on this rank (all workers; with skip_corrupt); a worker
        restarted for a new epoch counts a corrupt sample it draws again."""
        return self._skipped.value + self._skipped_here.value

    def skipped_all_ranks(self) -> int:
        """`skipped` with the training streams' skips summed over ranks (a collective when ranks are distributed);
        the index scan and validation read the same shards on every rank and count once."""
        stream = [self._skipped.value]
        if self.rank_world()[1] > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            stream = [0] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(stream, self._skipped.value)
        return sum(stream) + self._skipped_here.value

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
        sources, val = split_shards(self.cfg)
        self.val_shards = sorted({p for ps in val.values() for p in ps})
        mixed = len(sources) > 1
        if self.cfg.samples_per_epoch is None or mixed:  # count samples from the tar indexes, no decoding
            for name, shards in sources.items():
                counts = {p: self._keys(p) for p in shards}
                sources[name] = [p for p in shards if counts[p] is not None]
                if not sources[name]:
                    where = f" of data.sources.{name}" if name else ""
                    raise ShardError(f"all {len(counts)} training shards{where} are corrupt, e.g. {next(iter(counts))}")
                self.source_samples[name] = sum(len(counts[p]) for p in sources[name])
            self.train_samples = sum(self.source_samples.values())
        self.train_shards = [p for shards in sources.values() for p in shards]
        if self.cfg.sources is not None and self.cfg.shards is not None:
            log.info("data.sources is given: data.shards=%r is not used", self.cfg.shards)
        if mixed:
            # a shard of source S is drawn with probability w_S / N_S (N_S: samples of S), so each source's
            # share of the samples drawn is w_S / sum(w), whatever its size and shard sizes
            w = {name: float(self.cfg.sources[name].get("weight", 1.0)) for name in sources}
            self.shard_weights = [w[n] / self.source_samples[n] for n, shards in sources.items() for _ in shards]
            self.shard_source = {str(p): n for part in (sources, val) for n, ps in part.items() for p in ps if n}
            log.info(
                "mixing %s",
                ", ".join(
                    f"{n} (weight {w[n]:g}, {self.source_samples[n]} samples in {len(sources[n])} shards)"
                    for n in sources
                ),
            )
        self._ready = True

    def _keys(self, path: Path) -> list[str] | None:
        try:
            return shard_keys(path)
        except ShardError as e:
            if not self.cfg.skip_corrupt:
                raise
            with self._skipped_here.get_lock():
                self._skipped_here.value += 1
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

    def _position(self) -> int | None:
        """Batches of the current epoch the trainer has already trained (a resumed epoch starts past 0); None
        without a trainer."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer is not None else None

    def train_dataloader(self) -> StatefulLoader:
        self.setup()
        cfg, (rank, _) = self.cfg, self.rank_world()
        spec = StreamSpec(
            urls=[str(p) for p in self.train_shards],
            weights=self.shard_weights,
            seed=cfg.seed,
            rank=rank,
            skip=cfg.skip_corrupt,
            skipped=self._skipped,
            keep_text=cfg.text,
            sources=self.shard_source,
            crop_frames=cfg.crop_frames,
            shuffle_buffer=cfg.shuffle_buffer,
            batch_size=cfg.batch_size,
        )
        return StatefulLoader(
            StreamDataset(spec), self.steps_per_epoch, cfg.num_workers, self._epoch, self._position, self.rank_world
        )

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
        index = sorted((k, p) for p in self.val_shards for k in (self._keys(p) or []))[: cfg.val_samples]
        wanted = {k for k, _ in index}
        urls = sorted({str(p) for _, p in index})
        if not urls:  # every validation shard was corrupt and skipped (else _keys raised, naming it)
            log.warning(
                "no readable validation sample in the %d validation shard(s): validation is skipped",
                len(self.val_shards),
            )
            return []
        # the training stream's error handling, without resampling: shards in order, each read once
        stream = Corrupt(urls, cfg.skip_corrupt, self._skipped_here)
        raw = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(handler=stream.on_shard_error),
            wds.select(lambda r: r["__key__"] in wanted),
            wds.map(partial(prepare, keep_text=cfg.text, sources=self.shard_source), handler=stream.on_sample_error),
        )
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
        batches = [collate(b[i : i + bs]) for b in buckets.values() for i in range(0, len(b), bs)]
        return DataLoader(_Batches(batches), batch_size=None, shuffle=False, num_workers=0)
