"""Rank and world size from the launcher's environment (torchrun or SLURM), without a process group."""

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
