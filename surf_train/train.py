"""Training run: Hydra config -> datamodule, module, trainer, logger; resume; summary."""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from surf_train.errors import ConfigError

from surf_train.data import DataConfig, PairDataModule

log = logging.getLogger("surf_train")


def wandb_offline() -> bool:
    """W&B runs offline unless a key is configured or WANDB_MODE asks for online."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "run"):
        return False
    return mode in ("offline", "dryrun", "disabled") or not os.environ.get("WANDB_API_KEY")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file under a temporary name and renames it: a crash never leaves a torn file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def checkpoint_step(path: Path) -> int:
    """Global step stored in a Lightning checkpoint file or DeepSpeed checkpoint directory (no unpickling)."""
    path = Path(path)
    f = path / "checkpoint" / "mp_rank_00_model_states.pt" if path.is_dir() else path
    if not f.is_file():
        raise ConfigError(f"{path}: not a Lightning or DeepSpeed checkpoint (no {f.name})")
    return int(torch.load(f, map_location="cpu", weights_only=True)["global_step"])


def _complete(p: Path) -> bool:
    # checkpoint files are written under a temporary name; DeepSpeed writes `latest` after the shards
    return p.is_file() or (p / "latest").is_file()


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a rerun resumes from: checkpoints/last.ckpt or a newer SLURM hpc_ckpt_*.ckpt.

    last.ckpt links to the newest complete step checkpoint; if a kill left the link dangling (Lightning
    removes the old step before moving the link), the newest complete step checkpoint is used.
    """
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if not last.exists():
        steps = sorted((p for p in ckpt_dir.glob("step*.ckpt") if _complete(p)), key=lambda p: p.name)
        last = steps[-1] if steps else last
    cands = [p for p in [last, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def _relink_last(trainer: pl.Trainer, ckpt_dir: Path, step: int) -> None:
    """Save step<step>.ckpt (all ranks: ZeRO writes shards), then point last.ckpt at it atomically."""
    target = ckpt_dir / f"step{step:08d}.ckpt"
    trainer.save_checkpoint(target, weights_only=False)
    if trainer.is_global_zero:
        tmp = ckpt_dir / f"last.ckpt.{os.getpid()}.tmp"
        os.symlink(target.name, tmp)
        os.replace(tmp, ckpt_dir / "last.ckpt")
    trainer.strategy.barrier()


def _logger(cfg: DictConfig, run_dir: Path):
    if cfg.get("logger") is None or cfg.logger.get("_target_") is None:
        return False
    kwargs = {}
    if cfg.logger._target_.endswith("WandbLogger"):
        # one W&B run per run_dir: a resumed or requeued job continues the same run
        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            tmp = run_dir / f"wandb_id.{os.getpid()}.tmp"
            tmp.write_text(uuid.uuid4().hex[:12])
            os.replace(tmp, id_file)
        kwargs = {"id": id_file.read_text().strip(), "resume": "allow"}
    return instantiate(cfg.logger, **kwargs)


def fill_from_data(cfg: DictConfig, data_cfg: DataConfig) -> None:
    """`model.in_channels` / `model.text_dim` null and `module.decode_base: auto` take their values from the
    first training sample: its latent channels, its text width (0 without text) and the base model named in
    its metadata. So the default config trains on whatever base model the pairs came from."""
    from surf_train.data import split_shards
    from surf_train.shards import read_shards

    m = cfg.model
    if m.in_channels is not None and m.text_dim is not None and cfg.module.decode_base != "auto":
        return
    train_shards, _ = split_shards(data_cfg)
    first = next(p for paths in train_shards.values() for p in paths)
    sample = next(iter(read_shards([first])), None)
    if sample is None:
        raise ConfigError(f"{first}: no samples to read model.in_channels / model.text_dim / decode_base from")
    if m.in_channels is None:
        m.in_channels = int(sample["preview"].shape[0])
    if m.text_dim is None:
        m.text_dim = int(sample["text"].shape[-1]) if "text" in sample else 0
    if cfg.module.decode_base == "auto":
        cfg.module.decode_base = sample["meta"].get("base", {}).get("name")
    log.info("from %s: model.in_channels=%s model.text_dim=%s module.decode_base=%s", first, m.in_channels,
             m.text_dim, cfg.module.decode_base)


def train(cfg: DictConfig) -> dict:
    """Fit, validate once more with the final (EMA) weights, write summary.json; returns the summary."""
    register_resolvers()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    data_cfg = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    fill_from_data(cfg, data_cfg)
    data = PairDataModule(data_cfg)
    module = instantiate(cfg.module, _convert_="all")
    # every checkpoint gets its own step-named file or ZeRO directory; last.ckpt is a link that moves only
    # after a save completed, so a job killed mid-save resumes from the previous complete checkpoint
    ckpt_dir = run_dir / "checkpoints"
    # (no monitor: a monitored checkpoint on an epoch's last batch is deferred to a validation that may not run)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                           every_n_train_steps=cfg.ckpt_every, save_top_k=1, save_last="link")
    logger = _logger(cfg, run_dir)
    callbacks = [ckpt] + ([LearningRateMonitor("step")] if logger else [])
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    is_deepspeed = "deepspeed" in str(trainer_cfg.get("strategy", ""))
    plugins = [] if is_deepspeed else [AtomicCheckpointIO()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=plugins)

    resume = newest_checkpoint(run_dir) if cfg.resume else None
    init = cfg.get("init_from") if resume is None else None
    if resume is not None:
        log.info("resuming from %s", resume)
    elif init:
        log.info("initialised from %s (%s weights)", init, module.init_weights(init))
    # our own checkpoints hold only tensors, numbers and strings: load them without unpickling objects
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
    if trainer.global_step % cfg.ckpt_every:
        _relink_last(trainer, ckpt_dir, trainer.global_step)
    val = trainer.validate(module, datamodule=data, verbose=False) if data.cfg.val_samples else [{}]
    summary = {
        "steps": trainer.global_step,
        "resumed_from": str(resume) if resume else None,
        "initialised_from": str(init) if init else None,
        "train_loss_first": module.loss_first,
        "train_loss_last": module.loss_last,
        "val_mse_refiner": val[0].get("val/mse_refiner"),
        "val_mse_upsample": val[0].get("val/mse_upsample"),
        "world_size": trainer.world_size,
        "checkpoint": str((ckpt_dir / "last.ckpt").resolve()),
    }
    if trainer.is_global_zero:
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, run_dir / "summary.json")
        ref, up = summary["val_mse_refiner"], summary["val_mse_upsample"]
        val_txt = f"val mse refiner {ref:.4f} vs upsample {up:.4f}" if ref is not None else "no validation"
        print(f"[surf_train] {summary['steps']} steps, train loss {summary['train_loss_first']:.4f} -> "
              f"{summary['train_loss_last']:.4f}, {val_txt}; summary: {run_dir / 'summary.json'}", flush=True)
    return summary

