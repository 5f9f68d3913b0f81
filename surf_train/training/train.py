"""Training run: Hydra config -> datamodule, module, trainer, logger; resume; summary."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from surf_train.common.errors import ConfigError
from surf_train.data.datamodule import DataConfig, PairDataModule
from surf_train.training.callbacks import PlainProgress, SlurmRequeue, prune_hpc_checkpoints
from surf_train.training.config import RunConfig  # also puts conf/train.yaml's schema into Hydra's ConfigStore

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


def _load_meta(f: Path) -> dict:
    # mmap: reads the archive's index and the small objects, not the tensor bytes (checkpoints can be GBs)
    ck = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ck, dict) or "global_step" not in ck:
        raise ValueError("no global_step")
    return ck


def checkpoint_step(path: Path) -> int:
    """Global step stored in a Lightning checkpoint file or DeepSpeed checkpoint directory (no unpickling)."""
    path = Path(path)
    f = path / "checkpoint" / "mp_rank_00_model_states.pt" if path.is_dir() else path
    if not f.is_file():
        raise ConfigError(f"{path}: not a Lightning or DeepSpeed checkpoint (no {f.name})")
    try:
        return int(_load_meta(f)["global_step"])
    except Exception as e:
        raise ConfigError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:80]})") from None


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

    The file holding global_step (Lightning's, or ZeRO's mp_rank_00_model_states.pt) is loaded with
    weights_only; ZeRO's optimizer shards hold DeepSpeed classes that weights_only refuses, so for them the
    zip directory at the end of the file is read: a kill mid-write leaves none."""
    files = [p] if p.is_file() else sorted((p / "checkpoint").glob("*.pt"))
    if not files:
        return "no checkpoint files"
    for f in files:
        try:
            if f.name in (p.name, "mp_rank_00_model_states.pt"):
                ck = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(ck, dict) or "global_step" not in ck:
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
    its metadata. So the default config trains on whatever base model the pairs came from. The base model
    and the sizes of that sample are also recorded (`module.trained_on`), so an export names them."""
    from surf_train.data.datamodule import split_shards
    from surf_train.data.shards import read_shards

    m = cfg.model
    train_shards, _ = split_shards(data_cfg)
    first = next(p for paths in train_shards.values() for p in paths)
    sample = next(iter(read_shards([first])), None)
    if sample is None:
        raise ConfigError(f"{first}: no samples to read model.in_channels / model.text_dim / decode_base from")
    if m.in_channels is None:
        m.in_channels = int(sample["preview"].shape[0])
    if m.text_dim is None:
        m.text_dim = int(sample["text"].shape[-1]) if "text" in sample else 0
    meta = sample["meta"]
    if cfg.module.decode_base == "auto":
        cfg.module.decode_base = meta.get("base", {}).get("name")
    if cfg.module.get("trained_on") is None:
        cfg.module.trained_on = {
            "base": meta.get("base"),
            "latent_channels": int(sample["preview"].shape[0]),
            "preview_latent": list(sample["preview"].shape[1:]),
            "target_latent": list(sample["target"].shape[1:]),
            "preview_size": meta.get("preview_size"),
            "target_size": meta.get("target_size"),
        }
    log.info(
        "from %s: model.in_channels=%s model.text_dim=%s module.decode_base=%s",
        first,
        m.in_channels,
        m.text_dim,
        cfg.module.decode_base,
    )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _requeue_callback(trainer: pl.Trainer, cfg: DictConfig, run_dir: Path) -> SlurmRequeue | None:
    """Our batch-boundary requeue in place of Lightning's in-handler save, when SLURM auto-requeue is on."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment  # what Lightning's own signal handler reads
    if not (isinstance(env, SLURMEnvironment) and env.auto_requeue):
        return None
    cb = SlurmRequeue(run_dir, env.requeue_signal, keep=cfg.keep_hpc)
    trainer.callbacks.append(cb)
    return cb


def train(cfg: DictConfig) -> dict:
    """Fit, validate once more with the final (EMA) weights, write summary.json; returns the summary."""
    register_resolvers()
    RunConfig.from_cfg(cfg)  # the run-level keys checked: one ConfigError
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
    ckpt = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.ckpt_every,
        save_top_k=1,
        save_last="link",
    )
    logger = _logger(cfg, run_dir)
    callbacks = [ckpt] + ([LearningRateMonitor("step")] if logger else [])
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    extra = {}
    every = cfg.progress_every
    if every and not sys.stdout.isatty():  # a log file (SLURM output): plain lines instead of a progress bar
        callbacks.append(PlainProgress(every, data_cfg.batch_size))
        extra["enable_progress_bar"] = False
    is_deepspeed = "deepspeed" in str(trainer_cfg.get("strategy", ""))
    plugins = [] if is_deepspeed else [AtomicCheckpointIO()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=plugins, **extra)
    requeue = _requeue_callback(trainer, cfg, run_dir)

    found = resume_checkpoint(run_dir) if cfg.resume else None
    resume = found[0] if found else None
    init = cfg.init_from if resume is None else None
    if resume is not None:
        log.info("resuming from %s (step %d)", resume, found[1])
        if requeue is not None:
            prune_hpc_checkpoints(run_dir, requeue.keep, protect=resume)
    elif init:
        log.info("initialised from %s (%s weights)", init, module.init_weights(init))
    if requeue is not None:
        requeue.install()
    try:
        # our own checkpoints hold only tensors, numbers and strings: load them without unpickling objects
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
    finally:
        if requeue is not None:
            requeue.uninstall()
    if requeue is not None and requeue.saved is not None:
        # the job is requeued and will resume from this checkpoint: no final save, validation or summary
        print(
            f"[surf_train] requeued at step {requeue.saved_step}; the next job resumes from {requeue.saved}", flush=True
        )
        _close_process_group()
        return {"steps": trainer.global_step, "requeued": str(requeue.saved)}
    if trainer.global_step % cfg.ckpt_every:
        _relink_last(trainer, ckpt_dir, trainer.global_step)
    # [] when every validation shard was corrupt and skipped
    val = (trainer.validate(module, datamodule=data, verbose=False) if data.cfg.val_samples else None) or [{}]
    previous = _read_summary(run_dir)
    trained = module.loss_first is not None
    if not trained:
        log.info(
            "nothing to train: the run is already at step %d (trainer.max_steps=%s)",
            trainer.global_step,
            trainer.max_steps,
        )
    summary = {
        "steps": trainer.global_step,
        "resumed_from": str(resume) if resume else None,
        "initialised_from": str(init) if init else None,
        # a rerun that trained nothing reports the losses of the run that did
        "train_loss_first": module.loss_first if trained else previous.get("train_loss_first"),
        "train_loss_last": module.loss_last if trained else previous.get("train_loss_last"),
        "val_mse_refiner": val[0].get("val/mse_refiner"),
        "val_mse_upsample": val[0].get("val/mse_upsample"),
        "world_size": trainer.world_size,
        "checkpoint": str((ckpt_dir / "last.ckpt").resolve()),
        "data_skipped": data.skipped,  # skips of corrupt shards/samples on rank 0 (data.skip_corrupt); a sample
        # drawn again in a later epoch by restarted DataLoader workers counts again
    }
    if trainer.is_global_zero:
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, run_dir / "summary.json")
        ref, up = summary["val_mse_refiner"], summary["val_mse_upsample"]
        val_txt = f"val mse refiner {_fmt(ref)} vs upsample {_fmt(up)}" if ref is not None else "no validation"
        skip_txt = f", {data.skipped} skip(s) of corrupt shards/samples" if data.cfg.skip_corrupt else ""
        print(
            f"[surf_train] {summary['steps']} steps, train loss {_fmt(summary['train_loss_first'])} -> "
            f"{_fmt(summary['train_loss_last'])}, {val_txt}{skip_txt}; summary: {run_dir / 'summary.json'}",
            flush=True,
        )
    _close_process_group()
    return summary


def _close_process_group() -> None:
    """Tear the process group down before the interpreter exits; left to the exit, gloo's threads can abort it
    ("terminate called without an active exception", exit 6) after a run that finished and saved everything."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
