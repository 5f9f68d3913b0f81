"""Training checkpoints, their one home: where a checkpoint's state lives, reading one without unpickling,
the atomic writes, which one a rerun resumes from, and pruning of SLURM requeue checkpoints.

A checkpoint is a Lightning `.ckpt` file or a DeepSpeed ZeRO directory. Used by the run (`train`), its
requeue callback, the export and progressive training's `init_from`; imports none of them.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from surf_train.common.errors import ConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("surf_train")

EMA_PREFIX, NET_PREFIX = "ema.module.", "net."
ZERO_STATES = "mp_rank_00_model_states.pt"  # the file of a ZeRO directory that holds global_step and the weights


def state_file(path: Path) -> Path:
    """The file holding a checkpoint's state: the checkpoint itself, or a ZeRO directory's ZERO_STATES."""
    path = Path(path)
    return path / "checkpoint" / ZERO_STATES if path.is_dir() else path


def _load(f: Path, mmap: bool) -> object:
    # weights_only: our checkpoints hold only tensors, numbers and strings, so nothing is unpickled
    return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)


def load_meta(f: Path) -> dict | None:
    """A checkpoint's state file with its tensors left on disk, or None when it has no global_step.

    Raises what torch.load raises on a torn or foreign file."""
    # mmap: reads the archive's index and the small objects, not the tensor bytes (checkpoints can be GBs)
    ck = _load(f, mmap=True)
    return ck if isinstance(ck, dict) and "global_step" in ck else None


def checkpoint_step(path: Path) -> int:
    """Global step stored in a Lightning checkpoint file or DeepSpeed checkpoint directory (no unpickling)."""
    f = state_file(path)
    if not f.is_file():
        raise ConfigError(f"{path}: not a Lightning or DeepSpeed checkpoint (no {f.name})")
    try:
        ck = load_meta(f)
        if ck is None:
            raise ValueError("no global_step")
        return int(ck["global_step"])
    except Exception as e:
        raise ConfigError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:80]})") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(state dict of the LightningModule, its hyper-parameters, global step) from a .ckpt or ZeRO dir.

    The float32 EMA kept beside the module (surf_train.training.module.EMA) appears as ema.module.* entries."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    f = state_file(path)
    if not f.is_file():
        raise ConfigError(f"{path}: neither a Lightning checkpoint file nor a DeepSpeed checkpoint directory")
    try:
        ck = _load(f, mmap=False)
    except Exception as e:
        raise ConfigError(
            f"{f}: cannot be read as a checkpoint without unpickling objects ({type(e).__name__})"
        ) from None
    if not isinstance(ck, dict):
        raise ConfigError(f"{f}: not a training checkpoint")
    state = ck.get("state_dict", ck.get("module"))
    hp = ck.get("hyper_parameters")
    ema = ck.get("ema")
    if isinstance(state, dict) and isinstance(ema, dict) and isinstance(ema.get("state_dict"), dict):
        state = {**state, **{f"{EMA_PREFIX}{k}": v for k, v in ema["state_dict"].items()}}
    if (
        not isinstance(state, dict)
        or not isinstance(hp, dict)
        or "model" not in hp
        or not any(k.startswith(NET_PREFIX) for k in state)
    ):
        raise ConfigError(f"{path}: not a surf_train Refiner checkpoint (no net.* weights or model settings)")
    if path.is_dir() and any(v.numel() == 0 for k, v in state.items() if k.startswith(NET_PREFIX)):
        raise ConfigError(
            f"{path}: ZeRO-3 checkpoint (parameters are partitioned); convert it first with "
            f"lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict "
            f"and export the resulting file"
        )
    return state, hp, int(ck.get("global_step", -1))


def refiner_weights(
    state: dict[str, torch.Tensor], weights: str = "auto", where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str]:
    """The Refiner's tensors of a checkpoint state dict: "ema", "raw" or "auto" (EMA when present)."""
    has_ema = any(k.startswith(EMA_PREFIX) for k in state)
    if weights == "auto":
        weights = "ema" if has_ema else "raw"
    if weights not in ("ema", "raw"):
        raise ConfigError(f"--weights {weights!r}: choose ema, raw or auto")
    if weights == "ema" and not has_ema:
        raise ConfigError(
            f"{where}: no EMA weights in this checkpoint (trained with module.ema_decay=null); use --weights raw"
        )
    prefix = EMA_PREFIX if weights == "ema" else NET_PREFIX
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, weights


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file straight into its directory under a temporary name, then renames it: a crash
    never leaves a torn file. Lightning's own save goes through $TMPDIR (fsspec's transaction writes the whole
    checkpoint to a tempfile.mkstemp() file, then moves it), so a small node-local temporary directory failed
    saves that run_dir had room for. A failed write removes its temporary file and is one ConfigError."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # a full disk can first show here (or at close), not at write
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_error(path, e, tensor_bytes(checkpoint)) from None
        except RuntimeError as e:
            # torch's zip writer reports a short write (a disk filling up under it) as "unexpected pos", not as
            # an OSError: with less room than the checkpoint needs it is a full disk, otherwise an I/O error
            if "unexpected pos" not in str(e):
                tmp.unlink(missing_ok=True)
                raise
            need = tensor_bytes(checkpoint)
            full = shutil.disk_usage(tmp.parent).free < need - (tmp.stat().st_size if tmp.exists() else 0)
            tmp.unlink(missing_ok=True)
            code = errno.ENOSPC if full else errno.EIO
            raise write_error(path, OSError(code, os.strerror(code)), need) from None


def tensor_bytes(obj) -> int:
    """About the bytes torch.save writes for a nested dict/list of tensors: each storage once, plus ~300 bytes
    of zip record and pickle per storage (measured: 302 on a 277-tensor checkpoint) and the rest of the pickle."""
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return sum(storages.values()) + 400 * len(storages) + 16384


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def write_error(path: Path, e: OSError, need: int | None = None) -> ConfigError:
    """One line for a checkpoint that could not be written: the path, the reason, and on a full disk (or
    quota) how much the checkpoint needs against what is free."""
    msg = f"cannot write checkpoint {path}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("."))
        free = shutil.disk_usage(where).free
        need_txt = f"needs about {_size(need)}, " if need else ""
        msg += f" ({need_txt}{_size(free)} free on {where}); free space there or set run_dir on a larger disk"
    return ConfigError(msg)


def step_checkpoints(ckpt_dir: Path, every: int) -> ModelCheckpoint:
    """step<n>.ckpt every `every` steps, each its own file or ZeRO directory, and last.ckpt linking the newest.

    last.ckpt moves only after a save completed, so a job killed mid-save resumes from the previous complete
    checkpoint. No monitor: a monitored checkpoint on an epoch's last batch is deferred to a validation that
    may not run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_top_k=1,
        save_last="link",
    )


def relink_last(trainer: pl.Trainer, ckpt_dir: Path, step: int) -> Path:
    """Save step<step>.ckpt (all ranks: ZeRO writes shards), then point last.ckpt at it atomically.

    It becomes the one step checkpoint that step_checkpoints' ModelCheckpoint keeps (top 1): the previous one
    is removed, and the next regular save of a resumed run removes this one, instead of leaving a full
    checkpoint behind at every stop."""
    target = Path(ckpt_dir) / f"step{step:08d}.ckpt"
    cb = trainer.checkpoint_callback
    previous = Path(cb.best_model_path) if cb is not None and cb.best_model_path else None
    if cb is not None:
        cb.best_model_path = str(target.resolve())  # before the save: the callback's state is saved with it
    trainer.save_checkpoint(target, weights_only=False)
    if trainer.is_global_zero:
        tmp = target.parent / f"last.ckpt.{os.getpid()}.tmp"
        os.symlink(target.name, tmp)
        os.replace(tmp, target.parent / "last.ckpt")
    trainer.strategy.barrier()
    if previous is not None and previous.parent == target.parent.resolve() and previous.name != target.name:
        trainer.strategy.remove_checkpoint(previous)  # rank 0 removes it, as ModelCheckpoint does
    return target


def _complete(p: Path) -> bool:
    # checkpoint files are written under a temporary name; DeepSpeed writes `latest` after the shards
    return p.is_file() or (p / "latest").is_file()


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints a rerun could resume from, newest first: last.ckpt, step*.ckpt, SLURM hpc_ckpt_*.ckpt.

    last.ckpt links to the newest complete step checkpoint; if a kill left the link dangling (Lightning
    removes the old step before moving the link), the step checkpoints are still there.
    """
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    steps = sorted((p for p in ckpt_dir.glob("step*.ckpt") if _complete(p)), key=lambda p: p.name, reverse=True)
    hpc = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if _complete(p)]
    cands, seen = [], set()
    # newest first by mtime; last.ckpt before the step file it links to (same target, the name users know)
    for p in sorted(
        [*([last] if _complete(last) else []), *steps, *hpc], key=lambda p: (p.stat().st_mtime, p == last), reverse=True
    ):
        if p.resolve() not in seen:
            seen.add(p.resolve())
            cands.append(p)
    return cands


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete-looking checkpoint (see checkpoint_candidates), unread."""
    cands = checkpoint_candidates(run_dir)
    return cands[0] if cands else None


def _unreadable(p: Path) -> str | None:
    """Why checkpoint `p` cannot be resumed from (truncated, foreign, ...), or None when it looks whole.

    The state file (see state_file) is loaded with load_meta; ZeRO's optimizer shards hold DeepSpeed classes
    that weights_only refuses, so for them the zip directory at the end of the file is read: a kill mid-write
    leaves none."""
    files = [p] if p.is_file() else sorted((p / "checkpoint").glob("*.pt"))
    if not files:
        return "no checkpoint files"
    for f in files:
        try:
            if f == state_file(p):
                if load_meta(f) is None:
                    return f"{f.name}: not a training checkpoint (no global_step)"
            else:
                with zipfile.ZipFile(f) as z:
                    z.namelist()
        except Exception as e:
            return f"{f.name}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return None


def resume_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """(checkpoint, step) a rerun resumes from: the newest readable one, with one line per skipped one."""
    cands = checkpoint_candidates(run_dir)
    skipped = []
    for p in cands:
        why = _unreadable(p)
        if why is None:
            for q, r in skipped:
                log.warning("%s is unreadable (%s); resuming from the older %s", q, r, p)
            return p, checkpoint_step(p)
        skipped.append((p, why))
    if skipped:
        q, r = skipped[0]
        raise ConfigError(
            f"{run_dir}: none of its {len(skipped)} checkpoint(s) can be resumed from (newest {q}: "
            f"{r}); remove them or run with resume=false"
        )
    return None


def hpc_checkpoints(run_dir: Path) -> list[Path]:
    """run_dir/hpc_ckpt_<n>.ckpt, oldest (smallest n) first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(run_dir).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return [p for _, p in sorted(found)]


def prune_hpc_checkpoints(run_dir: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` hpc checkpoints, never `protect` (what a rerun resumes from)."""
    old = hpc_checkpoints(run_dir)[:-keep] if keep > 0 else hpc_checkpoints(run_dir)
    gone = []
    for p in old:
        if protect is not None and p.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()  # a ZeRO checkpoint is a directory
        gone.append(p)
    return gone
