"""Training strategies: Lightning's DeepSpeedStrategy, made to run on CPU for tests.

Lightning refuses DeepSpeed without CUDA. `CPUDeepSpeedStrategy` removes exactly the three CUDA-only
guards (docs/architecture.md#facts-the-code-relies-on); it touches Lightning internals, so lightning is pinned
in pyproject and tested.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy over gloo on CPU processes (ZeRO-2/3 train, checkpoint and resume)."""

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        # skip DeepSpeedStrategy's CUDAAccelerator check, keep the parent's set-up
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        # as DeepSpeedStrategy, minus _validate_device_index_selection (CPU devices have no index)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        # Lightning hands root_device.index to deepspeed as the device rank; a bare CPU device has None
        return torch.device("cpu", self.local_rank)


def deepspeed_strategy(stage: int = 2, accelerator: str = "gpu", **kwargs) -> DeepSpeedStrategy:
    """ZeRO `stage` strategy: Lightning's own on GPU, the CPU variant on CPU."""
    cls = CPUDeepSpeedStrategy if accelerator == "cpu" else DeepSpeedStrategy
    return cls(stage=stage, **kwargs)
