"""Training run: Hydra config -> datamodule, module, trainer, logger; resume; summary."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import uuid
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from surf_train.common.dist_env import first_process
from surf_train.common.errors import ConfigError
from surf_train.common.lock import DirLock
from surf_train.data.datamodule import DataConfig, PairDataModule
from surf_train.training.callbacks import PlainProgress, SlurmRequeue, StopOnSignal, Stopped
from surf_train.training.checkpoint import (
    AtomicCheckpointIO,
    prune_hpc_checkpoints,
    relink_last,
    resume_checkpoint,
    step_checkpoints,
    write_error,
)
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
    from surf_train.data.meta import preview_kind
    from surf_train.data.shards import read_shards

    m = cfg.model
    train_shards, _ = split_shards(data_cfg)
    firsts = {name: paths[0] for name, paths in train_shards.items() if paths}
    samples = {name: next(iter(read_shards([path])), None) for name, path in firsts.items()}
    for name, s in samples.items():
        if s is None:
            raise ConfigError(f"{firsts[name]}: no samples to read model.in_channels / text_dim / decode_base from")
    check_sources(firsts, samples)
    first, sample = next(iter(firsts.values())), next(iter(samples.values()))
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
            # each source's (its first sample's): what a Refiner with model.kind_condition was told
            "preview_kinds": {name: preview_kind(s["meta"]) for name, s in samples.items()},
        }
    log.info(
        "from %s: model.in_channels=%s model.text_dim=%s module.decode_base=%s",
        first,
        m.in_channels,
        m.text_dim,
        cfg.module.decode_base,
    )


def _signature(sample: dict) -> dict:
    """What every source of one run must share: the base model (its record in the metadata), the latent
    channels and the text width (None without text)."""
    base = sample["meta"].get("base") or {}
    return {
        "base model": {k: base.get(k) for k in ("id", "revision", "family")},
        "latent channels": int(sample["preview"].shape[0]),
        "text width": int(sample["text"].shape[-1]) if "text" in sample else None,
    }


def check_sources(firsts: dict[str, Path], samples: dict[str, dict]) -> None:
    """Before the first step: every source's first sample agrees with the first source's on the base model,
    latent channels and text width (docs/training.md#mixing-sources); one ConfigError naming both otherwise."""
    (name0, s0), *rest = samples.items()
    want = _signature(s0)
    for name, s in rest:
        got = _signature(s)
        bad = [k for k in want if got[k] != want[k]]
        if bad:
            diff = "; ".join(f"{k} {want[k]} vs {got[k]}" for k in bad)
            raise ConfigError(
                f"data.sources.{name0} ({firsts[name0]}) and data.sources.{name} ({firsts[name]}) come from "
                f"different base models or latents: {diff}"
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
    """Fit, validate once more with the final (EMA) weights, write summary.json; returns the summary. A run
    stopped by SIGTERM or SIGINT writes and returns it with "stopped": the signal's name, and no validation
    (docs/training.md#stopping-a-run)."""
    register_resolvers()
    RunConfig.from_cfg(cfg)  # the run-level keys checked: one ConfigError
    check_accelerator(cfg.trainer)
    run_dir = Path(cfg.run_dir)
    lock = run_lock(run_dir)
    try:
        return _run(cfg, run_dir)
    finally:
        if lock is not None:
            lock.release()


def check_accelerator(trainer_cfg: DictConfig) -> None:
    """A GPU trainer on a machine whose torch sees no (or too few) CUDA GPUs: one ConfigError before the data
    and the model are read and built (a paper-sized Refiner takes minutes and GBs)."""
    acc, devices = str(trainer_cfg.get("accelerator", "auto")), trainer_cfg.get("devices", "auto")
    if acc not in ("gpu", "cuda"):
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not found:
        raise ConfigError(
            f"trainer.accelerator={acc}: this torch ({torch.__version__}) sees no CUDA GPU; run on a GPU node, "
            f"or on CPU with trainer=cpu"
        )
    if isinstance(devices, int) and devices > found:
        raise ConfigError(f"trainer.devices={devices}: this node has {found} CUDA GPU(s)")


def run_lock(run_dir: Path) -> DirLock | None:
    """run_dir/train.lock, held by the launch's first process only (the other ranks of one run share it):
    a second training of the same run_dir is refused in one line (docs/training.md#stopping-a-run)."""
    if not first_process():
        return None
    busy = f"run_dir {run_dir} is being trained"
    return DirLock(run_dir / "train.lock", busy, what="run_dir").acquire()


def _run(cfg: DictConfig, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    data, module = _data_and_module(cfg)
    trainer = _trainer(cfg, run_dir, data.cfg)
    requeue = _requeue_callback(trainer, cfg, run_dir)
    stop = None if requeue is not None else StopOnSignal(run_dir / "checkpoints")
    if stop is not None:
        trainer.callbacks.append(stop)
    resume, init = _start_point(cfg, run_dir, module, requeue)
    _fit(trainer, module, data, resume, requeue or stop, run_dir)
    if requeue is not None and requeue.saved is not None:
        # the job is requeued and will resume from this checkpoint: no final save, validation or summary
        print(
            f"[surf_train] requeued at step {requeue.saved_step}; the next job resumes from {requeue.saved}", flush=True
        )
        _close_process_group()
        return {"steps": trainer.global_step, "requeued": str(requeue.saved)}
    # a signal stops the run: its checkpoint of this step is saved, no final validation
    stopped = stop.stopping(trainer) if stop is not None else None
    if trainer.global_step % cfg.ckpt_every and not (stop is not None and stop.saved is not None):
        relink_last(trainer, run_dir / "checkpoints", trainer.global_step)
    summary = _summary(trainer, module, data, run_dir, resume, init, validate=stopped is None)
    if stopped:
        summary["stopped"] = stopped
    if trainer.is_global_zero:
        _write_summary(summary, run_dir, data)
    _close_process_group()
    return summary


def _data_and_module(cfg: DictConfig) -> tuple[PairDataModule, pl.LightningModule]:
    """The datamodule and the LightningModule, with the model sizes the config leaves null read from the data."""
    data_cfg = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    fill_from_data(cfg, data_cfg)
    data = PairDataModule(data_cfg)
    return data, instantiate(cfg.module, _convert_="all")


def _trainer(cfg: DictConfig, run_dir: Path, data_cfg: DataConfig) -> pl.Trainer:
    """The configured Trainer with step checkpoints, the logger, and plain progress lines in a log file."""
    ckpt = step_checkpoints(run_dir / "checkpoints", cfg.ckpt_every)
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
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=plugins, **extra)


def _start_point(
    cfg: DictConfig, run_dir: Path, module: pl.LightningModule, requeue: SlurmRequeue | None
) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, init_from weights loaded instead); resuming prunes old requeue checkpoints."""
    found = resume_checkpoint(run_dir) if cfg.resume else None
    resume = found[0] if found else None
    init = cfg.init_from if resume is None else None
    if resume is not None:
        log.info("resuming from %s (step %d)", resume, found[1])
        if requeue is not None:
            prune_hpc_checkpoints(run_dir, requeue.keep, protect=resume)
    elif init:
        log.info("initialised from %s (%s weights)", init, module.init_weights(init))
    return resume, init


def _fit(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    data: PairDataModule,
    resume: Path | None,
    handler: SlurmRequeue | StopOnSignal | None,
    run_dir: Path,
) -> None:
    """trainer.fit with our signal handlers installed for its duration; a stop or a full disk ends it."""
    if handler is not None:
        handler.install()
    try:
        # our own checkpoints hold only tensors, numbers and strings: load them without unpickling objects
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
    except Stopped:
        pass  # StopOnSignal saved this step's checkpoint
    except SIGTERMException:  # Lightning's handler saw SIGTERM before ours took over (StopOnSignal.on_train_start)
        if not isinstance(handler, StopOnSignal):
            raise
        handler.signum = handler.signum or signal.SIGTERM
    except OSError as e:  # DeepSpeed's own writes (AtomicCheckpointIO's are one ConfigError already)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise write_error(Path(e.filename or run_dir), e) from None
    finally:
        if handler is not None:
            handler.uninstall()


def _summary(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    data: PairDataModule,
    run_dir: Path,
    resume: Path | None,
    init: str | None,
    validate: bool = True,
) -> dict:
    """Validate the final weights (all ranks; not for a stopped run) and gather summary.json's keys."""
    # [] when every validation shard was corrupt and skipped
    validate = validate and data.cfg.val_samples > 0
    val = (trainer.validate(module, datamodule=data, verbose=False) if validate else None) or [{}]
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
        "checkpoint": str((run_dir / "checkpoints" / "last.ckpt").resolve()),
        "data_skipped": data.skipped_all_ranks(),  # skips of corrupt shards/samples, all ranks (data.skip_corrupt);
        # a sample drawn again in a later epoch by restarted DataLoader workers counts again
    }
    if "val/mse_to_teacher" in val[0]:  # a distillation (module.distill): the student's K steps vs the teacher's
        summary["val_mse_to_teacher"] = val[0]["val/mse_to_teacher"]
    return summary


def _write_summary(summary: dict, run_dir: Path, data: PairDataModule) -> None:
    """summary.json (atomically) and its one-line digest on stdout."""
    tmp = run_dir / f"summary.json.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, run_dir / "summary.json")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {run_dir / 'summary.json'}: {e.strerror or e}") from None
    if summary.get("stopped"):
        print(
            f"[surf_train] stopped by {summary['stopped']} at step {summary['steps']}: checkpoint "
            f"{summary['checkpoint']}, the same command resumes from it; summary: {run_dir / 'summary.json'}",
            flush=True,
        )
        return
    ref, up = summary["val_mse_refiner"], summary["val_mse_upsample"]
    val_txt = f"val mse refiner {_fmt(ref)} vs upsample {_fmt(up)}" if ref is not None else "no validation"
    skip_txt = f", {summary['data_skipped']} skip(s) of corrupt shards/samples" if data.cfg.skip_corrupt else ""
    print(
        f"[surf_train] {summary['steps']} steps, train loss {_fmt(summary['train_loss_first'])} -> "
        f"{_fmt(summary['train_loss_last'])}, {val_txt}{skip_txt}; summary: {run_dir / 'summary.json'}",
        flush=True,
    )


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
