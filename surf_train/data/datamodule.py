"""Training and validation data from (preview, target) pair shards (schema: surf_train.data.shards).

Training is an endless stream of shards drawn with replacement, cut to the same number of batches per
epoch on every rank: uneven per-rank sample counts hang DDP (docs/architecture.md#facts-the-code-relies-on).
Validation is a fixed set held in memory. Entries are decoded by `decode_sample` only, so nothing in a shard is
unpickled.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from surf_train.common.config import check
from surf_train.common.errors import ConfigError
from surf_train.data.shards import ShardError, decode_sample, list_shards, raise_named, shard_keys

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


def collate(samples: Sequence[dict]) -> dict:
    """Samples of one shape -> {"preview": (B,C,F,h,w), "target": (B,C,F,H,W), ["text": (B,L,D)], "keys", "meta"}.

    Text is stored at its real length: it is zero-padded to the longest in the batch (the Refiner masks
    all-zero rows, so this is what the zero-padded text of older shards gave)."""
    batch = {name: torch.stack([s[name] for s in samples]).float() for name in ("preview", "target")}
    if "text" in samples[0]:
        n = max(s["text"].shape[0] for s in samples)
        batch["text"] = torch.stack(
            [torch.nn.functional.pad(s["text"], (0, 0, 0, n - s["text"].shape[0])) for s in samples]
        ).float()  # (B, L, D)
    batch["keys"] = [s["key"] for s in samples]
    batch["meta"] = [s["meta"] for s in samples]
    return batch


def shape_key(sample: dict) -> tuple:
    """What a batch must share: the latent shapes and the text width (None without text); text lengths differ."""
    text = sample["text"].shape[1:] if "text" in sample else None
    return tuple(sample["preview"].shape), tuple(sample["target"].shape), text


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
        out[name] = sample[name][:, start : start + frames]
    return out


def prepare(raw: dict, keep_text: bool = True, sources: dict[str, str] | None = None) -> dict:
    """decode_sample plus the checks the training loop relies on; `sources` (shard url -> name) tags
    meta["data_source"] when sources are mixed."""
    s = decode_sample(raw)
    if sources:
        s["meta"]["data_source"] = sources.get(raw.get("__url__"), "?")
    if s["preview"].ndim != 4 or s["target"].ndim != 4 or s["preview"].shape[:2] != s["target"].shape[:2]:
        raise ShardError(
            f"{raw.get('__url__', '?')}: sample {s['key']}: preview {tuple(s['preview'].shape)} and "
            f"target {tuple(s['target'].shape)} must be (C, F, h, w) and (C, F, H, W)"
        )
    if not keep_text:
        s.pop("text", None)
    return s


class _Stream:
    """Per-worker state of the training stream: seeds, the current epoch, shards found corrupt."""

    def __init__(self, urls: list[str], seed: int, rank: int, skipped, skip: bool, weights: list[float] | None = None):
        self.urls, self.seed, self.rank, self.skipped, self.skip = urls, seed, rank, skipped, skip
        self.weights = weights  # per url: draw probabilities of mixed sources; None: uniform
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
        log.warning(
            "skipped corrupt shard %s (%d skipped so far): %s: %s",
            url,
            self._count(),
            type(exn).__name__,
            exn.args[0] if exn.args else "",
        )
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
        limit, ok, okw, nbad = 4 * len(st.urls) + 16, st.urls, st.weights, 0
        while True:
            if len(st.bad) != nbad:
                keep = [i for i, u in enumerate(st.urls) if u not in st.bad]
                ok, nbad = [st.urls[i] for i in keep], len(st.bad)
                okw = [st.weights[i] for i in keep] if st.weights else None
            if not ok:
                raise ShardError(f"all {len(st.urls)} training shards are corrupt, e.g. {st.urls[0]}")
            if st.since_good > limit:
                raise ShardError(
                    f"no readable sample in the last {limit} shards drawn from {len(st.urls)} "
                    f"training shards, e.g. {st.urls[0]}"
                )
            st.since_good += 1
            yield {"url": rng.choices(ok, weights=okw)[0] if okw else rng.choice(ok)}


def _decoded(src: Iterable[dict], stream: _Stream, keep_text: bool, sources: dict[str, str] | None) -> Iterator[dict]:
    for s in wds.map(partial(prepare, keep_text=keep_text, sources=sources), handler=stream.on_sample_error)(src):
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
        self.source_samples: dict[str, int] = {}  # training samples per source (mixed sources only)
        self.shard_weights: list[float] | None = None  # draw probability of each training shard (mixed sources)
        self.shard_source: dict[str, str] = {}  # shard url -> source name (mixed sources)
        self._skipped = multiprocessing.Value("q", 0)  # shared with DataLoader workers
        self._val: list[dict] | None = None
        self._epochs = 0
        self._ready = False

    @property
    def skipped(self) -> int:
        """Skips of corrupt shards and samples so far (all workers; with skip_corrupt); a worker restarted for a
        new epoch counts a corrupt sample it draws again."""
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
        stream = _Stream(
            [str(p) for p in self.train_shards], cfg.seed, rank, self._skipped, cfg.skip_corrupt, self.shard_weights
        )
        stages = [
            _Shards(stream),
            wds.tarfile_to_samples(handler=stream.on_shard_error),
            partial(_decoded, stream=stream, keep_text=cfg.text, sources=self.shard_source),
        ]
        if cfg.crop_frames:
            stages.append(partial(_cropped, stream=stream, frames=cfg.crop_frames))
        if cfg.shuffle_buffer > 1:
            stages.append(partial(_shuffled, stream=stream, bufsize=cfg.shuffle_buffer))
        stages.append(partial(group_batches, batch_size=cfg.batch_size))
        loader = _TrainLoader(
            wds.DataPipeline(*stages),
            stream,
            self._epoch,
            batch_size=None,
            num_workers=cfg.num_workers,
            persistent_workers=False,
        )
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
        stream = _Stream(urls, cfg.seed, 0, self._skipped, cfg.skip_corrupt)
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
