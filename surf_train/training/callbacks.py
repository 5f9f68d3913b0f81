"""Training callbacks: SLURM requeue at a batch boundary, plain progress lines for non-terminal logs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

from surf_train.training.checkpoint import hpc_checkpoints, prune_hpc_checkpoints

log = logging.getLogger("surf_train")


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: <array job>_<task> for array tasks, else SLURM_JOB_ID."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(pl.Callback):
    """Saves hpc_ckpt_<n>.ckpt and requeues the job after SLURM's pre-timeout signal, at a batch boundary.

    Lightning saves from inside its signal handler, which can run in the middle of a step's collectives on
    several ranks. Here the handler only sets a flag; at the end of every training batch the ranks agree
    (any rank flagged) with one all-reduce, then all of them save (ZeRO writes one shard per rank), rank 0
    runs `scontrol requeue`, and training stops. Installing our handler first keeps Lightning's away.
    """

    def __init__(self, run_dir: Path, signum: int = signal.SIGUSR1, keep: int = 2):
        self.run_dir, self.signum, self.keep = Path(run_dir), signum, keep
        self.flagged = False
        self.saved: Path | None = None  # the checkpoint written after the signal
        self.saved_step: int | None = None
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._on_signal)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.flagged = True  # nothing else here: the save happens at the next batch boundary

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.saved is not None or not trainer.strategy.reduce_boolean_decision(self.flagged, all=False):
            return
        n = (int(hpc_checkpoints(self.run_dir)[-1].stem.split("_")[-1]) + 1) if hpc_checkpoints(self.run_dir) else 1
        path = Path(trainer.strategy.broadcast(str(self.run_dir / f"hpc_ckpt_{n}.ckpt"), src=0))
        print(
            f"[surf_train] rank {trainer.global_rank}: requeue signal, saving {path.name} at step "
            f"{trainer.global_step} (batch boundary)",
            flush=True,
        )
        trainer.save_checkpoint(path)
        self.saved, self.saved_step = path, trainer.global_step
        if trainer.is_global_zero:
            for p in prune_hpc_checkpoints(self.run_dir, self.keep, protect=path):
                log.info("removed old requeue checkpoint %s", p)
            job = slurm_job_id()
            if job:
                rc = subprocess.call(["scontrol", "requeue", job])
                print(f"[surf_train] scontrol requeue {job}: {'ok' if rc == 0 else f'failed (exit {rc})'}", flush=True)
        trainer.strategy.barrier()
        trainer.should_stop = True


class PlainProgress(pl.Callback):
    """One line every `every` steps (step, loss, samples/s, ETA) on rank 0: readable in SLURM output files."""

    def __init__(self, every: int, batch_size: int):
        self.every, self.batch_size = every, batch_size
        self._t0: float | None = None
        self._step0 = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every or self._t0 is None or step == self._step0:
            return
        elapsed = time.perf_counter() - self._t0
        done = step - self._step0
        rate = done * self.batch_size * trainer.world_size / max(elapsed, 1e-9)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        eta = str(timedelta(seconds=round(elapsed / done * (total - step)))) if total else "?"
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss_txt = f"{float(loss):.4f}" if isinstance(loss, torch.Tensor) else "?"
        print(
            f"[surf_train] step {step}/{total or '?'} loss {loss_txt} {rate:.1f} samples/s ETA {eta}",
            file=sys.stdout,
            flush=True,
        )
