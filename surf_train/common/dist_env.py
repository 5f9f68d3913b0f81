"""Rank and world size from the launcher's environment (torchrun, SLURM or Lightning's own launcher) and the SLURM
job id, without a process group."""

from __future__ import annotations

import os


def rank_world() -> tuple[int, int]:
    """(global rank, world size): torchrun's RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS, else (0, 1)."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            rank, world = int(os.environ[r]), int(os.environ[w])
            if not 0 <= rank < world:
                raise ValueError(f"{r}={rank} outside [0, {w}={world})")
            return rank, world
    return 0, 1


def local_rank() -> int:
    """Index of this process on its node (device index for GPUs)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def first_process() -> bool:
    """Whether this is the launch's global rank 0: torchrun's RANK or SLURM_PROCID, and for the processes that
    Lightning's own launcher starts (they get NODE_RANK and LOCAL_RANK, no RANK) node 0's local rank 0."""
    return rank_world()[0] == 0 and int(os.environ.get("NODE_RANK", 0)) == 0 and local_rank() == 0


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: <array job>_<task> for array tasks, else SLURM_JOB_ID."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")
