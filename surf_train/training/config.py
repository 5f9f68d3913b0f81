"""The training run's settings: the run-level keys of conf/train.yaml (`RunConfig`), and the schema of the whole
config (`train_schema`, put into Hydra's ConfigStore on import) whose defaults are the settings dataclasses', so
conf/ only sets what differs (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

from surf_train.common.config import check, schema
from surf_train.common.errors import ConfigError
from surf_train.data.datamodule import DataConfig
from surf_train.training.module import OptimConfig, RefinerModule
from surf_train.training.objective import BridgeConfig


@dataclass
class RunConfig:
    """The run-level keys of conf/train.yaml (everything outside data, model, module, trainer and logger)."""

    name: str | int = "tiny"  # run name: W&B run name and run directory
    run_dir: str = "runs/${name}"  # checkpoints/, summary.json, videos/; rerunning the same command resumes here
    seed: int = 0
    ckpt_every: int = 100  # checkpoint every N optimizer steps (and at the end)
    resume: bool = True  # resume from the newest readable checkpoint in run_dir when there is one
    keep_hpc: int = 2  # SLURM requeue checkpoints (hpc_ckpt_*.ckpt) kept; the one a rerun resumes from stays
    progress_every: int = 50  # stdout not a terminal (SLURM logs): a plain progress line every N steps; 0: none
    # a fresh run starts from these Refiner weights (EMA where present): a .ckpt, a ZeRO-2 checkpoint directory or
    # an exported Refiner; ignored when resuming (progressive stage 2)
    init_from: str | None = None

    def __post_init__(self):
        check(self)
        for name, low in (("ckpt_every", 1), ("keep_hpc", 0), ("progress_every", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= {low}")

    @classmethod
    def from_cfg(cls, cfg) -> RunConfig:
        """The run-level keys of a composed (resolved on access) train config."""
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


def module_schema() -> type:
    """RefinerModule's keyword arguments with the defaults of its signature; `_target_` is set by train.yaml."""
    out = [("_target_", Any, dataclasses.field(default="???"))]
    for name, p in list(inspect.signature(RefinerModule.__init__).parameters.items())[1:]:
        nested = {"bridge": BridgeConfig, "optim": OptimConfig}.get(name)
        if nested is not None:
            twin = schema(nested)
            out.append((name, twin, dataclasses.field(default_factory=twin)))
        else:
            out.append((name, Any, dataclasses.field(default="???" if p.default is p.empty else p.default)))
    return dataclasses.make_dataclass("RefinerModuleArgs", out)


def train_schema() -> type:
    """conf/train.yaml's schema: the groups (data typed, model, trainer and logger as their YAML gives them), the
    run-level keys, then the module's arguments."""
    run = schema(RunConfig)
    groups = [("data", schema(DataConfig)), ("model", None), ("trainer", None), ("logger", None)]
    out = [
        (k, Any, dataclasses.field(default="???")) if t is None else (k, t, dataclasses.field(default_factory=t))
        for k, t in groups
    ]
    out += [(f.name, Any, dataclasses.field(default=f.default)) for f in dataclasses.fields(run)]
    module = module_schema()
    out.append(("module", module, dataclasses.field(default_factory=module)))
    return dataclasses.make_dataclass("TrainConfig", out)


def register_configs() -> None:
    """Put `train_schema` into Hydra's ConfigStore (conf/train.yaml extends it); runs on import."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=train_schema())


register_configs()
