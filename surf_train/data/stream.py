"""The training stream with its position as a small state: what a checkpoint saves to resume mid-epoch exactly.

Per rank and DataLoader worker, the stream draws shards with replacement (weighted when sources are mixed),
reads their samples in order, crops them in time, shuffles them in a buffer and groups them into batches of one
shape. Every random choice comes from three `random.Random` generators seeded by (seed, rank, worker, epoch), so
the stream's state after any batch is small and explicit (`WorkerStream.state`): the generators' states, the
shard being read and the byte offset of its next sample, and references (shard, offset, crop start) to the
samples waiting in the shuffle buffer and the batch buckets. Resuming re-reads only those samples (at most
`shuffle_buffer + shapes * batch_size`); nothing is replayed. `StatefulLoader` keeps, per worker, the state that
came with the last batch the training loop took (workers read ahead), which Lightning saves in the checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from surf_train.data.meta import preview_kind
from surf_train.data.shards import ShardError, decode_sample, raise_named
from surf_train.models.refiner import PREVIEW_KINDS

log = logging.getLogger(__name__)

# Lightning warns that __len__ of an IterableDataset may be wrong with several workers; StatefulLoader's length
# is exact (each worker draws its own endless stream, the loader takes `steps` batches of them)
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

STATE_VERSION = 1
_ENTRY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # <key>.<ext>, webdataset's rule: the key ends at the first dot
RNGS = ("shards", "crop", "shuffle")


def collate(samples: list[dict]) -> dict:
    """Samples of one shape -> {"preview": (B,C,F,h,w), "target": (B,C,F,H,W), ["text": (B,L,D)], "preview_kind":
    (B,) indices into PREVIEW_KINDS, "keys", "meta"}.

    Text is stored at its real length: it is zero-padded to the longest in the batch (the Refiner masks
    all-zero rows, so this is what the zero-padded text of older shards gave)."""
    batch = {name: torch.stack([s[name] for s in samples]).float() for name in ("preview", "target")}
    if "text" in samples[0]:
        n = max(s["text"].shape[0] for s in samples)
        batch["text"] = torch.stack(
            [torch.nn.functional.pad(s["text"], (0, 0, 0, n - s["text"].shape[0])) for s in samples]
        ).float()  # (B, L, D)
    batch["preview_kind"] = torch.tensor([PREVIEW_KINDS.index(preview_kind(s["meta"])) for s in samples])  # (B,)
    batch["keys"] = [s["key"] for s in samples]
    batch["meta"] = [s["meta"] for s in samples]
    return batch


def shape_key(sample: dict) -> tuple:
    """What a batch must share: the latent shapes and the text width (None without text); text lengths differ."""
    text = sample["text"].shape[1:] if "text" in sample else None
    return tuple(sample["preview"].shape), tuple(sample["target"].shape), text


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


class Corrupt:
    """What a stream does with unreadable shards and samples: raise naming them, or warn, count and skip."""

    def __init__(self, urls: list[str], skip: bool, skipped):
        self.urls, self.skip, self.skipped = urls, skip, skipped  # skipped: a multiprocessing.Value
        self.bad: set[str] = set()  # shards that failed here are not drawn again in this worker
        self.seen: set[str] = set()  # corrupt samples already reported by this worker

    def _count(self) -> int:
        with self.skipped.get_lock():
            self.skipped.value += 1
            return self.skipped.value

    def shard(self, url: str, exn: Exception) -> None:
        if not self.skip:
            raise (
                exn if isinstance(exn, ShardError) else ShardError(f"{url}: cannot read ({type(exn).__name__}: {exn})")
            )
        self.bad.add(url)
        why = str(exn) if isinstance(exn, ShardError) else f"{type(exn).__name__}: {exn}"
        log.warning("skipped corrupt shard %s (%d skipped so far): %s", url, self._count(), why)

    def on_shard_error(self, exn: Exception) -> bool:
        """webdataset handler: the url is the one its message names."""
        if not self.skip:
            return raise_named(exn)
        text = " ".join(str(a) for a in exn.args)
        self.shard(next((u for u in self.urls if u in text), "?"), exn)
        return True

    def on_sample_error(self, exn: Exception) -> bool:
        if not self.skip:
            return raise_named(exn)
        if str(exn) not in self.seen:
            self.seen.add(str(exn))
            log.warning("skipped corrupt sample (%d skipped so far): %s", self._count(), exn)
        return True


class _TarCursor:
    """The samples of one shard from a byte offset on; a sample is the consecutive entries <key>.<ext>."""

    def __init__(self, url: str, offset: int = 0):
        self.url, self.file = url, open(url, "rb")
        try:
            self.file.seek(offset)
            # "r:" reads headers from the file's position on (TarFile starts at fileobj.tell())
            self.tar = tarfile.open(fileobj=self.file, mode="r:")
            self.pending = self._member()
        except BaseException:
            self.file.close()
            raise

    @property
    def offset(self) -> int | None:
        """Byte offset of the next sample's first header; None at the end of the shard."""
        return None if self.pending is None else self.pending.offset

    def _member(self) -> tarfile.TarInfo | None:
        while (m := self.tar.next()) is not None:
            if m.isreg() and _ENTRY.match(m.name) and not os.path.basename(m.name).startswith("__"):
                return m
        return None

    def next(self) -> tuple[int, dict] | None:
        """(offset, raw entries) of the next sample, or None at the end; ShardError names what cannot be read."""
        m = self.pending
        if m is None:
            return None
        key = _ENTRY.match(m.name).group(1)
        start, raw = m.offset, {"__key__": key, "__url__": self.url}
        while m is not None and _ENTRY.match(m.name).group(1) == key:
            ext = _ENTRY.match(m.name).group(2).lower()
            if ext in raw:
                raise ShardError(f"{self.url}: sample {key}: entry {m.name} appears twice")
            try:
                raw[ext] = self.tar.extractfile(m).read()
                m = self._member()
            except (tarfile.TarError, OSError, EOFError) as e:
                raise ShardError(f"{self.url}: sample {key}: cannot read {m.name} ({type(e).__name__}: {e})") from e
        self.pending = m
        return start, raw

    def close(self) -> None:
        self.file.close()


@dataclass
class StreamSpec:
    """What every worker's stream is made of (pickled into DataLoader workers)."""

    urls: list[str]
    weights: list[float] | None  # per url: draw probabilities of mixed sources; None: uniform
    seed: int
    rank: int
    skip: bool
    skipped: Any  # multiprocessing.Value shared by the workers
    keep_text: bool
    sources: dict[str, str]  # shard url -> source name (mixed sources)
    crop_frames: int | None
    shuffle_buffer: int
    batch_size: int

    def fingerprint(self) -> dict:
        """What a saved state is only valid with: shards (by name, so data can move) and the stream settings."""
        names = "\n".join(f"{os.path.basename(u)} {w}" for u, w in zip(self.urls, self.weights or [1] * len(self.urls)))
        return {
            "data.seed": self.seed,
            "data.batch_size": self.batch_size,
            "data.crop_frames": self.crop_frames,
            "data.shuffle_buffer": self.shuffle_buffer,
            "data.text": self.keep_text,
            "training shards and source weights": hashlib.sha256(names.encode()).hexdigest()[:16],
        }


def _rng_state(r: random.Random) -> list:
    version, internal, gauss = r.getstate()
    return [version, list(internal), gauss]


class WorkerStream:
    """One worker's endless batches, with `state()` after each and `from state` resumption."""

    def __init__(self, spec: StreamSpec, epoch: int, worker: int, salt: str = "", state: dict | None = None):
        self.spec, self.corrupt = spec, Corrupt(spec.urls, spec.skip, spec.skipped)
        self.rngs = {w: random.Random(f"{spec.seed}/{spec.rank}/{worker}/{epoch}{salt}/{w}") for w in RNGS}
        self.cursor: _TarCursor | None = None
        self._index = -1  # the cursor's shard (index into spec.urls)
        self.buffer: list[tuple[tuple, dict]] = []  # ((url index, offset, crop start), sample)
        self.buckets: dict[tuple, list[tuple[tuple, dict]]] = {}
        self.since_good = 0  # shards drawn since the last sample decoded
        if state is not None:
            self._restore(state)

    def state(self) -> dict:
        refs = lambda items: [list(ref) for ref, _ in items]  # noqa: E731
        return {
            "rng": {w: _rng_state(r) for w, r in self.rngs.items()},
            "shard": None if self.cursor is None or self.cursor.offset is None else [self._index, self.cursor.offset],
            "buffer": refs(self.buffer),
            "buckets": [refs(b) for b in self.buckets.values() if b],
            "bad": sorted(self.spec.urls.index(u) for u in self.corrupt.bad if u in self.spec.urls),
            "seen": sorted(self.corrupt.seen),
            "since_good": self.since_good,
        }

    def _restore(self, st: dict) -> None:
        for w, (version, internal, gauss) in st["rng"].items():
            self.rngs[w].setstate((version, tuple(internal), gauss))
        self.corrupt.bad = {self.spec.urls[i] for i in st["bad"]}
        self.corrupt.seen, self.since_good = set(st["seen"]), st["since_good"]
        self.buffer = [self._reread(ref) for ref in st["buffer"]]
        for bucket in st["buckets"]:
            items = [self._reread(ref) for ref in bucket]
            self.buckets[shape_key(items[0][1])] = items
        if st["shard"] is not None:
            self._index = st["shard"][0]
            self.cursor = _TarCursor(self.spec.urls[self._index], st["shard"][1])

    def _reread(self, ref: list) -> tuple[tuple, dict]:
        """A sample the checkpoint refers to, read again at its byte offset and cropped as before."""
        index, offset, start = ref
        url = self.spec.urls[index]
        try:
            cursor = _TarCursor(url, offset)
            try:
                _, raw = cursor.next()
            finally:
                cursor.close()
            s = prepare(raw, self.spec.keep_text, self.spec.sources)
        except Exception as e:
            raise ShardError(
                f"{url}: the sample at byte {offset} that the checkpoint refers to cannot be read "
                f"again ({type(e).__name__}: {e}); was the shard rewritten?"
            ) from e
        return (index, offset, start), (s if start is None else crop(s, self.spec.crop_frames, start))

    def _draw(self) -> int:
        """Index of the next shard to read (with replacement, skipping shards found corrupt)."""
        urls, bad = self.spec.urls, self.corrupt.bad
        keep = [i for i, u in enumerate(urls) if u not in bad]
        if not keep:
            raise ShardError(f"all {len(urls)} training shards are corrupt, e.g. {urls[0]}")
        limit = 4 * len(urls) + 16
        if self.since_good > limit:
            raise ShardError(
                f"no readable sample in the last {limit} shards drawn from {len(urls)} training shards, e.g. {urls[0]}"
            )
        self.since_good += 1
        rng, w = self.rngs["shards"], self.spec.weights
        return rng.choices(keep, weights=[w[i] for i in keep])[0] if w else rng.choice(keep)

    def _samples(self) -> Iterator[tuple[tuple, dict]]:
        """Endless (reference, decoded and cropped sample); the cursor is left just after the sample yielded."""
        spec = self.spec
        while True:
            if self.cursor is None:
                self._index = self._draw()
                try:
                    self.cursor = _TarCursor(spec.urls[self._index])
                except Exception as e:
                    self.corrupt.shard(spec.urls[self._index], e)
                    continue
            try:
                got = self.cursor.next()
            except Exception as e:
                self.cursor.close()
                self.cursor = None
                self.corrupt.shard(spec.urls[self._index], e)
                continue
            if got is None:
                self.cursor.close()
                self.cursor = None
                continue
            try:
                s = prepare(got[1], spec.keep_text, spec.sources)
            except Exception as e:
                self.corrupt.on_sample_error(e)
                continue
            self.since_good, start, n = 0, None, s["target"].shape[1]
            if spec.crop_frames and n > spec.crop_frames:
                start = self.rngs["crop"].randint(0, n - spec.crop_frames)
                s = crop(s, spec.crop_frames, start)
            yield (self._index, got[0], start), s

    def __iter__(self) -> Iterator[dict]:
        """Collated batches of `batch_size` samples of one shape, after a shuffle buffer of `shuffle_buffer`."""
        bufsize, rng = self.spec.shuffle_buffer, self.rngs["shuffle"]
        for item in self._samples():
            if bufsize > 1:
                self.buffer.append(item)
                if len(self.buffer) < bufsize:
                    continue
                k = rng.randrange(len(self.buffer))
                item, self.buffer[k] = self.buffer[k], self.buffer[-1]
                self.buffer.pop()
            key = shape_key(item[1])
            bucket = self.buckets.setdefault(key, [])
            bucket.append(item)
            if len(bucket) == self.spec.batch_size:
                del self.buckets[key]
                yield collate([s for _, s in bucket])


class StreamDataset(IterableDataset):
    """Each worker's (batch, state after it); worker j of a resumed epoch continues saved worker (rotation + j)."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.epoch, self.rotation, self.salt = 0, 0, ""
        self.states: list[dict | None] = []  # saved state per (original) worker; [] or None entries: fresh

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotation) % workers
        state = self.states[worker] if worker < len(self.states) else None
        stream = WorkerStream(self.spec, self.epoch, worker, self.salt, state)
        for batch in stream:
            yield batch, stream.state()


def _as_is(batch):
    return batch


class StatefulLoader(DataLoader):
    """`steps` batches per epoch of a StreamDataset, resumable mid-epoch.

    Lightning saves `state_dict()` in the checkpoint (the fit loop's "combined_loader" state) and hands it back
    to `load_state_dict` on resume. A batch's state is the state of the worker that made it; workers take turns
    (worker i makes batches i, i + W, ...), so after n batches the state of worker w is the one that came with its
    last batch taken, and a resumed epoch starts with worker n mod W (`StreamDataset.rotation`). The checkpoint is
    written by rank 0 (DDP) or holds rank 0's client state (DeepSpeed), so every rank's state is gathered at save
    and each rank takes its own at load.
    """

    def __init__(
        self,
        dataset: StreamDataset,
        steps: int,
        num_workers: int,
        epoch_fn: Callable[[], int],
        position_fn: Callable[[], int | None],
        rank_world: Callable[[], tuple[int, int]],
    ):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is)
        self.steps, self.epoch_fn, self.position_fn, self.rank_world = steps, epoch_fn, position_fn, rank_world
        self._epoch: int | None = None
        self._consumed = 0  # batches of this epoch taken by the training loop
        self._states: list[dict | None] = []  # per worker: its state after its last batch taken
        self._loaded: dict | None = None  # this rank's saved state, for the epoch it belongs to
        self._diffs: list[str] = []  # why the saved state cannot be used (another world size, ...)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        return self._batches()

    def _batches(self) -> Iterator[dict]:
        # runs at the first next(): the trainer's epoch and position are then those of the epoch being trained
        epoch, pos, workers = self.epoch_fn(), self.position_fn(), max(1, self.num_workers)
        ds, saved, diffs = self.dataset, self._loaded, self._diffs
        self._loaded, self._diffs = None, []
        if pos is None:  # no trainer: the loader's own state says where the epoch stands
            pos = saved["consumed"] if saved is not None and saved["epoch"] == epoch else 0
        ds.epoch, ds.rotation, ds.salt, ds.states = epoch, 0, "", []
        if saved is not None and not diffs and saved["epoch"] == epoch and saved["consumed"] == pos:
            ds.rotation, ds.states = pos % workers, saved["workers"]
        elif pos > 0:  # mid-epoch without a usable state: fresh batches, not the start of the epoch again
            ds.salt = f"/from{pos}"
            if not diffs:
                diffs = [
                    "the checkpoint holds no data-stream state"
                    if saved is None
                    else f"its data stream is at batch {saved['consumed']} of epoch {saved['epoch']}, "
                    f"training resumes at batch {pos} of epoch {epoch}"
                ]
            if self.rank_world()[0] == 0:
                log.warning(
                    "the data stream cannot resume exactly (%s): the rest of epoch %d draws fresh batches (seeded "
                    "by the resume point), not an uninterrupted run's; later epochs are those of a run with these "
                    "settings",
                    "; ".join(diffs),
                    epoch,
                )
        self._epoch, self._consumed = epoch, pos
        self._states = [*ds.states, *[None] * (workers - len(ds.states))][:workers]
        it = super().__iter__()
        for _ in range(self.steps - pos):
            batch, state = next(it)
            self._states[self._consumed % workers] = state
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        """{"version", "world_size", "ranks": [state of each rank]}; a collective when ranks are distributed."""
        rank, world = self.rank_world()
        spec = self.dataset.spec
        mine = {
            "epoch": self._epoch,
            "consumed": self._consumed,
            "workers": self._states,
            "num_workers": self.num_workers,
            "skipped": spec.skipped.value,
            "fingerprint": spec.fingerprint(),
        }
        ranks: list[dict | None] = [None] * world
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks[rank] = mine
        return {"version": STATE_VERSION, "world_size": world, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        """Keep this rank's saved stream for its epoch, and what differs if it cannot continue exactly."""
        rank, world = self.rank_world()
        ranks = state.get("ranks") or []
        mine = ranks[rank] if rank < len(ranks) else None
        with self.dataset.spec.skipped.get_lock():  # a rank that is gone hands its count to rank (its rank % world)
            self.dataset.spec.skipped.value = sum(s["skipped"] for i, s in enumerate(ranks) if s and i % world == rank)
        self._loaded, self._diffs = mine, self._differences(state, mine, world)

    def _differences(self, state: dict, mine: dict | None, world: int) -> list[str]:
        if state.get("version") != STATE_VERSION:
            return [f"data-stream state version {state.get('version')}, this code reads {STATE_VERSION}"]
        if mine is None:
            return [f"no data-stream state for this rank among the checkpoint's {len(state.get('ranks') or [])}"]
        diffs = [f"world size {state['world_size']} -> {world}"] if state["world_size"] != world else []
        if mine["num_workers"] != self.num_workers:
            diffs.append(f"data.num_workers {mine['num_workers']} -> {self.num_workers}")
        now = self.dataset.spec.fingerprint()
        for k, v in now.items():
            if mine["fingerprint"].get(k) != v:
                diffs.append(
                    f"{k} changed" if k.startswith("training shards") else f"{k} {mine['fingerprint'].get(k)} -> {v}"
                )
        return diffs
