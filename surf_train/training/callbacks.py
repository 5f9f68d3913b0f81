"""Training callbacks: SLURM requeue and honest stops (SIGTERM, SIGINT) at a batch boundary, plain progress lines
for non-terminal logs."""

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

from surf_train.common.dist_env import slurm_job_id
from surf_train.training.checkpoint import hpc_checkpoints, prune_hpc_checkpoints, relink_last

log = logging.getLogger("surf_train")


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


class Stopped(Exception):
    """Ends trainer.fit after StopOnSignal saved its checkpoint; train() writes the stopped summary."""


class StopOnSignal(pl.Callback):
    """SIGTERM and SIGINT where the SLURM requeue path is off: save at the next batch boundary, then stop.

    Lightning's own SIGTERM handler ends training without a checkpoint and the process exits 0 (its
    SIGTERMException is a SystemExit); Ctrl-C saved nothing either. Here the handlers only record the signal;
    after every optimizer step the ranks agree on it (the largest signal number of any rank, one all-reduce),
    all of them save step<n>.ckpt and move last.ckpt to it (ZeRO writes one shard per rank), and `Stopped`
    ends trainer.fit. A second signal of the same kind gets the handler from before (stop at once, no save).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = Path(ckpt_dir)
        self.signum: int | None = None  # the first signal this process received
        self.stopped: str | None = None  # the signal all ranks agreed on
        self.saved: Path | None = None  # the checkpoint written at the batch boundary after it
        self._previous: dict[int, object] = {}
        self._step: int | None = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == self.signum:  # the second one: what it did before (SIGTERM ends the process)
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
        elif self.signum is None:
            self.signum = signum  # nothing else here (no print: the handler may interrupt one)

    def stopping(self, trainer: pl.Trainer) -> str | None:
        """The name of the signal any rank received (the largest number), or None: a collective, every rank
        calls it at the same point, until it has found one."""
        if self.stopped is None:
            mine = torch.tensor(self.signum or 0, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(mine, reduce_op="max"))
            self.stopped = signal.Signals(signum).name if signum else None
        return self.stopped

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # trainer.fit has put Lightning's SIGTERM handler over ours: ours again (fit restores both at its end)
        if self._previous:
            signal.signal(signal.SIGTERM, self._on_signal)
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:  # accumulating gradients: no optimizer step yet
            return
        self._step = trainer.global_step
        if self.stopping(trainer) is None:
            return
        self.saved = relink_last(trainer, self.ckpt_dir, trainer.global_step)
        raise Stopped(self.stopped)


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
