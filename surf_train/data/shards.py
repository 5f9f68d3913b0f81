"""The one shard schema: how a (preview, target) pair is stored in WebDataset tar shards.

A sample is two tar entries under one key:
  <key>.tensors.safetensors  preview (C, F, h, w), target (C, F, H, W), optional text (L, D)
  <key>.json                 metadata (prompt, seed, base model, shapes, schedule, reshift, version,
                             sha256 of the safetensors bytes, text length)
Tensors are safetensors bytes (fp16/bf16/fp32), so reading never unpickles. Text is stored at its real
length L (trailing all-zero rows, the encoder's padding, are dropped); batches pad it again.
Shards are written under a temporary name and renamed when complete, by the one process that holds
the directory's lock for its rank (`OutDirLock`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import webdataset as wds
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from surf_train.common.lock import DirLock

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TENSORS = "tensors.safetensors"
META = "json"
REQUIRED_TENSORS = ("preview", "target")
REQUIRED_META = ("key", "schema", "source", "preview_shape", "target_shape")
TMP_SUFFIX = ".tmp"
CHECKSUM = "sha256"  # metadata field: sha256 of the safetensors bytes (shards written before it have none)
TEXT_LENGTH = "text_length"  # metadata field: rows of the stored text (L)


class ShardError(RuntimeError):
    """A shard or sample that cannot be read; the message names it."""


def trim_text(text: torch.Tensor) -> torch.Tensor:
    """(L, D) text -> its first rows up to the last one that is not all zero (at least one row).

    Encoders pad with zero rows and the Refiner masks all-zero rows (models.refiner.text_padding_mask), so padding the
    trimmed text with zeros again gives the same mask and the same attention.
    """
    rows = (text != 0).any(-1).nonzero()  # (n, 1): indices of the rows with a non-zero value
    return text[: int(rows[-1]) + 1 if len(rows) else 1]


def encode_sample(key: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Tensors + metadata -> the dict that webdataset's TarWriter writes."""
    missing = [k for k in REQUIRED_TENSORS if k not in tensors]
    if missing:
        raise ValueError(f"sample {key}: missing tensors {missing}")
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    if "text" in tensors:
        tensors["text"] = trim_text(tensors["text"])
    blob = st_save({k: v.contiguous() for k, v in tensors.items()})
    meta = {
        **meta,
        "key": key,
        "schema": SCHEMA_VERSION,
        CHECKSUM: hashlib.sha256(blob).hexdigest(),
        "preview_shape": list(tensors["preview"].shape),
        "target_shape": list(tensors["target"].shape),
        **({TEXT_LENGTH: tensors["text"].shape[0]} if "text" in tensors else {}),
    }
    return {"__key__": key, TENSORS: blob, META: json.dumps(meta, sort_keys=True).encode()}


def decode_sample(raw: dict) -> dict:
    """Raw tar entries (bytes) -> {"key", "meta", tensor names...}; never unpickles."""
    where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"
    extra = sorted(k for k in raw if not k.startswith("__") and k not in (TENSORS, META))
    if extra or TENSORS not in raw or META not in raw:
        raise ShardError(f"{where}: expected entries {TENSORS!r} and {META!r}, got {sorted(raw)}")
    try:
        meta = json.loads(raw[META])
        # checked before parsing: a flipped byte in the tensor data would otherwise decode as a wrong value
        digest = meta.get(CHECKSUM) if isinstance(meta, dict) else None
        read = hashlib.sha256(raw[TENSORS]).hexdigest() if digest is not None else None
        if read != digest:
            raise ShardError(
                f"{where}: checksum mismatch in {TENSORS} (sha256 {digest[:12]}... recorded, "
                f"{read[:12]}... read): the bytes are corrupt"
            )
        tensors = st_load(raw[TENSORS])
    except ShardError:
        raise
    except Exception as e:  # corrupt bytes: name the sample, keep the cause
        raise ShardError(f"{where}: cannot decode ({type(e).__name__}: {e})") from e
    missing = [k for k in REQUIRED_TENSORS if k not in tensors] + [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ShardError(f"{where}: missing fields {missing}")
    if meta["schema"] != SCHEMA_VERSION:
        raise ShardError(f"{where}: schema {meta['schema']} but this code reads schema {SCHEMA_VERSION}")
    if "text" in tensors and meta.get(TEXT_LENGTH, tensors["text"].shape[0]) != tensors["text"].shape[0]:
        raise ShardError(f"{where}: text has {tensors['text'].shape[0]} rows but {TEXT_LENGTH}={meta[TEXT_LENGTH]}")
    return {"key": meta["key"], "meta": meta, **tensors}


def sample_bytes(
    preview: tuple[int, ...],
    target: tuple[int, ...],
    text: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float16,
    meta: dict | None = None,
) -> int:
    """Bytes one sample of these tensor shapes takes in a shard (both tar entries, headers and padding included;
    a shard adds 1024 end-of-archive bytes, rounded up to 10240). Computed by writing zeros (text: ones, so
    that it keeps its length) with `meta` as the metadata through the shard writer's tar format."""
    tensors = {"preview": torch.zeros(preview, dtype=dtype), "target": torch.zeros(target, dtype=dtype)}
    if text is not None:
        tensors["text"] = torch.ones(text, dtype=dtype)
    buf = io.BytesIO()
    writer = wds.TarWriter(buf)
    writer.write(encode_sample("0" * 16, tensors, {"source": "generated", **(meta or {})}))
    writer.tarstream.close()  # the end marker and padding; the BytesIO stays open
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def shard_name(prefix: str, rank: int, index: int) -> str:
    return f"{prefix}-r{rank:03d}-{index:06d}.tar"


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """Complete shards in a directory, sorted (temporary files are not listed)."""
    return sorted(Path(directory).glob("*.tar"))


def shard_keys(path: Path) -> list[str]:
    """Sample keys in one complete shard, read from the tar index without decoding payloads."""
    members: list[tarfile.TarInfo] = []
    try:
        # "r:": shards are plain tar; the default mode would report a bad header as "not a gzip file" etc.
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            try:
                members.extend(tar)
            except tarfile.ReadError as e:  # a header after an extended (pax) header is cut or corrupt
                cut = f.seek(0, os.SEEK_END) - tar.offset < 3 * 512  # pax header, its records, plain header
                why = "truncated inside the entry" if cut else "invalid tar header"
                raise ShardError(f"{path}: {why} at byte {tar.offset} ({e}) after {len(members)} entries") from e
            # tarfile stops quietly where a file was cut or a header is corrupt: a complete tar ends in two
            # zero blocks right after the last entry it read
            end = members[-1].offset_data + -(-members[-1].size // 512) * 512 if members else 0
            f.seek(end)
            tail = f.read(1024)
    except tarfile.ReadError as e:  # the first header
        if os.path.getsize(path) < 3 * 512:
            raise ShardError(f"{path}: truncated ({os.path.getsize(path)} bytes: not even one tar entry)") from e
        raise ShardError(f"{path}: not a readable tar shard (first tar header: {e})") from e
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{path}: not a readable tar shard ({e})") from e
    if tail != bytes(1024):
        raise ShardError(f"{path}: {_cause(tail, end)} after {len(members)} entries")
    return sorted({os.path.basename(m.name).split(".", 1)[0] for m in members})


def _cause(tail: bytes, offset: int) -> str:
    """Why a tar stops before its end-of-archive marker, from the bytes where the next header should be."""
    if len(tail) < 512 or (tail[:512] == bytes(512) and len(tail) < 1024):
        return f"truncated (no end-of-archive marker at byte {offset})"
    if tail[:512] == bytes(512):
        return f"corrupt end-of-archive marker at byte {offset + 512}"
    try:
        tarfile.TarInfo.frombuf(tail[:512], tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:  # e.g. "bad checksum": a flipped byte in the header
        return f"invalid tar header at byte {offset} ({e})"
    return f"unreadable tar entry at byte {offset}"


def raise_named(exn: Exception) -> bool:
    """webdataset error handler: re-raise as a ShardError that names the shard."""
    if isinstance(exn, ShardError):
        raise exn
    # webdataset appends the shard url to the exception's args
    where = next((a for a in reversed(exn.args) if isinstance(a, str) and ".tar" in a), "shard")
    first = exn.args[0] if exn.args else exn
    raise ShardError(f"{where}: cannot read ({type(exn).__name__}: {first})") from exn


def read_shards(paths: Iterable[str | os.PathLike]) -> Iterator[dict]:
    """Decoded samples from shards, in order, single process (tests, export, inspection)."""
    urls = [str(p) for p in paths]
    if not urls:
        return iter(())
    # every given shard, in this process, even under torchrun (no node or worker splitting)
    ds = wds.WebDataset(
        urls, shardshuffle=False, empty_check=False, handler=raise_named, nodesplitter=None, workersplitter=None
    )
    return map(decode_sample, ds)


class ShardWriter:
    """Writes samples into `<prefix>-r<rank>-<n>.tar` shards of at most `max_count` samples.

    Each shard is written as `<name>.<pid>.tmp` and renamed when it is closed, so a crash at any point
    leaves only complete shards with `.tar` names, and a writer renames only its own file; `start_index`
    continues numbering on resume.
    """

    def __init__(
        self, directory: str | os.PathLike, rank: int, max_count: int, prefix: str = "pairs", start_index: int = 0
    ):
        self.dir, self.rank, self.max_count, self.prefix = Path(directory), rank, max_count, prefix
        self.index, self.count, self.bytes, self.shards = start_index, 0, 0, 0
        self._file = self._tar = None
        self.dir.mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        self._path = self.dir / shard_name(self.prefix, self.rank, self.index)
        self._tmp = f"{self._path}.{os.getpid()}{TMP_SUFFIX}"
        self._file = open(self._tmp, "xb")  # never truncates a file that another process is writing
        self._tar = wds.TarWriter(self._file)

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._path)
        self.bytes += self._path.stat().st_size
        self.shards += 1
        self.index += 1
        self._tar = self._file = None
        self.count = 0

    def write(self, sample: dict) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self.count += 1
        if self.count >= self.max_count:
            self.close_shard()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close_shard()


def remove_partial(directory: str | os.PathLike, rank: int, prefix: str = "pairs") -> int:
    """Delete this rank's leftover temporary shards (from a crash); returns how many. Call it holding the
    rank's `OutDirLock`: then no live process is writing them."""
    leftovers = list(Path(directory).glob(f"{prefix}-r{rank:03d}-*.tar*{TMP_SUFFIX}"))
    for p in leftovers:
        p.unlink()
    return len(leftovers)


def next_index(directory: str | os.PathLike, rank: int, prefix: str = "pairs") -> int:
    """First free shard number for this rank."""
    nums = [int(p.stem.rsplit("-", 1)[1]) for p in Path(directory).glob(f"{prefix}-r{rank:03d}-*.tar")]
    return max(nums, default=-1) + 1


def lock_path(directory: str | os.PathLike, rank: int) -> Path:
    return Path(directory) / f"r{rank:03d}.lock"


class OutDirLock(DirLock):
    """One writing process per (out_dir, rank): `<out_dir>/r<rank>.lock` (surf_train.common.lock.DirLock)."""

    def __init__(self, directory: str | os.PathLike, rank: int):
        super().__init__(lock_path(directory, rank), f"rank {rank} of {directory} is being written")
        self.rank = rank
