"""The LightningModule that trains a Refiner with the bridge objective (docs/method.md#refiner-objective)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from surf_train.common.config import check
from surf_train.common.errors import ConfigError, known_keys
from surf_train.models.refiner import Refiner, refiner_config
from surf_train.training.distill import DistillConfig, Teacher, distill_loss, load_teacher
from surf_train.training.objective import BridgeConfig, bridge_loss

log = logging.getLogger(__name__)
LOSS_WINDOW = 10


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine (or constant) decay; defaults are the tiny run's (paper: lr 5e-5)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    decay: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio * lr

    def __post_init__(self):
        self.betas = tuple(self.betas)
        check(self, "optim.")


def lr_schedule(opt: torch.optim.Optimizer, o: OptimConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' linear warmup (from 0 at step 0) then cosine down to min_lr_ratio * lr at `total`, or constant."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    if o.decay == "constant":
        return get_constant_schedule_with_warmup(opt, o.warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(opt, o.warmup_steps, total, min_lr_rate=o.min_lr_ratio)


class EMA:
    """Exponential moving average of a network's weights, in float32 and outside the training engine.

    DeepSpeed casts the whole engine module to bf16 under bf16-mixed; an EMA with decay 0.9999 in bf16
    cannot move ((1 - d) * (p - e) is below bf16's resolution of e). So the copy is not a submodule: the
    engine never sees it, it stays float32, and it travels in checkpoints under its own key ("ema"). Under
    ZeRO-2 every rank holds the full (bf16) parameters and updates its own identical copy; under ZeRO-3 the
    parameters are partitioned and gathering them every step would cost a full all-gather, so it is refused.
    """

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(net).float().requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        ema, cur = list(self.module.parameters()), [p.detach().float() for p in net.parameters()]
        if self.updates == 0:  # the first update copies, as torch's AveragedModel EMA does
            torch._foreach_copy_(ema, cur)
        else:
            torch._foreach_lerp_(ema, cur, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), net.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"state_dict": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])


class RefinerModule(pl.LightningModule):
    """Bridge-flow training of a shifted-window Refiner, with EMA and a K-step validation sampler; with `distill`,
    distillation of an exported K-step Refiner into a few-step student (surf_train.training.distill)."""

    def __init__(
        self,
        model: dict,
        bridge: dict | None = None,
        optim: dict | None = None,
        ema_decay: float | None = None,
        init_from_wan: str | None = None,
        use_text: bool = True,
        decode_base: str | None = None,
        val_videos: int = 1,
        video_dir: str | None = None,
        trained_on: dict | None = None,
        distill: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = refiner_config(model)
        self.bridge = BridgeConfig(**known_keys(bridge, BridgeConfig, "module.bridge"))
        self.optim = OptimConfig(**known_keys(optim, OptimConfig, "module.optim"))
        self.distill: DistillConfig | None = None
        if distill and init_from_wan:
            raise ConfigError("module.distill starts the student from the teacher: set module.init_from_wan=null")
        if init_from_wan:
            self.net, report = Refiner.from_wan_transformer(init_from_wan, **self.model_cfg.to_dict())
            log.info(
                "initialised from %s: %d tensors copied, %d skipped",
                init_from_wan,
                len(report.copied),
                len(report.skipped),
            )
        else:
            self.net = Refiner.from_cfg(self.model_cfg)
        # plain attributes, not submodules: see EMA; the teacher stays out of the optimizer and the checkpoints
        object.__setattr__(self, "teacher", self._distill_from(distill) if distill else None)
        object.__setattr__(self, "ema", EMA(self.net, ema_decay) if ema_decay else None)
        self._decoder = None
        self._noise_seed = 0  # set at fit start
        self._losses_first: list[torch.Tensor] = []  # first and last LOSS_WINDOW losses of this process
        self._losses_last: collections.deque = collections.deque(maxlen=LOSS_WINDOW)

    def _distill_from(self, distill: dict) -> Teacher:
        """Load the teacher, start the student from its weights, and take its sampler with the student's K as this
        run's bridge (validation's, and recorded in the checkpoints, so the export's)."""
        self.distill = DistillConfig(**known_keys(distill, DistillConfig, "module.distill"))
        teacher = load_teacher(self.distill, self.model_cfg)
        self.net.load_state_dict(teacher.net.state_dict())
        given, default = dataclasses.asdict(self.bridge), dataclasses.asdict(BridgeConfig())
        self.bridge = teacher.student_bridge(self.distill.steps)
        mine = dataclasses.asdict(self.bridge)
        ignored = [f"{k}={v}" for k, v in given.items() if v != default[k] and v != mine[k]]
        if ignored:
            log.warning("module.distill: the bridge is the teacher's, module.bridge %s ignored", " ".join(ignored))
        self.hparams["bridge"] = mine
        log.info(
            "distilling %s (%d steps) into a %d-step student, start noise %s (%s)",
            self.distill.teacher,
            teacher.sampler.steps,
            self.distill.steps,
            teacher.sampler.start_noise,
            teacher.sampler.noise_space,
        )
        return teacher

    def init_weights(self, path: str) -> str:
        """Load another run's Refiner weights into this fresh module (progressive stage 2); returns "ema",
        "raw" or "exported". Reads a .ckpt, a ZeRO-2 directory or an exported Refiner, never unpickling."""
        from surf_train.models.loading import check_weights, load_refiner, shapes
        from surf_train.training.checkpoint import read_checkpoint, refiner_weights

        p = Path(path)
        if p.is_dir() and not (p / "checkpoint").is_dir():  # not a ZeRO directory: an export (either format)
            tensors, used = load_refiner(path)[0].state_dict(), "exported"
        else:
            tensors, used = refiner_weights(read_checkpoint(path)[0], "auto", str(path))
        check_weights(shapes(self.net.state_dict()), shapes(tensors), str(path))
        self.net.load_state_dict(tensors)  # copies into the existing parameters, converting the dtype
        if self.ema is not None:
            self.ema.module.load_state_dict(tensors)
        return used

    # --- training -------------------------------------------------------------------------------
    def _net_fn(self, net: Refiner, kind: torch.Tensor | None = None):
        """The network as the objective and the sampler call it, (x, t, cond, text) -> velocity; `kind` the batch's
        preview kinds (`_kind`), told to a Refiner with kind_condition."""
        dtype = next(net.parameters()).dtype  # the float32 EMA beside a bf16 engine module

        def fn(x, t, cond, txt):
            cast = (lambda y: y) if x.dtype == dtype else (lambda y: None if y is None else y.to(dtype))
            out = net(cast(x), cast(t), cast(cond), cast(txt), return_dict=False, preview_kind=kind)
            return out[0].to(x.dtype)  # text's zero rows: padding

        return fn

    def _text(self, batch: dict) -> torch.Tensor | None:
        return batch.get("text") if self.hparams.use_text and self.model_cfg.text_dim else None

    def _kind(self, batch: dict) -> torch.Tensor | None:
        """The batch's (B,) preview kinds for a Refiner with kind_condition, else None."""
        return batch["preview_kind"] if self.model_cfg.kind_condition else None

    def on_fit_start(self) -> None:
        stage = getattr(self.trainer.strategy, "zero_stage_3", False)
        if stage and self.ema is not None:
            raise ConfigError("EMA needs full parameters on every rank: use ZeRO stage 2 or set module.ema_decay=null")
        if self.ema is not None:
            self.ema.module.to(self.device)
        if self.teacher is not None:
            self.teacher.net.to(self.device)
        self._noise_seed = torch.initial_seed()  # the run's seed (seed_everything), before the reseed below
        # ranks draw different bridge times and noise from the same seed
        torch.manual_seed(torch.initial_seed() + 1000 * self.global_rank + self.global_step)

    def _noise(self, batch_idx: int) -> torch.Generator:
        """The bridge times and noise of one batch, from (seed, rank, step, batch): a resumed run draws the
        uninterrupted run's (docs/training.md#what-a-resume-guarantees)."""
        key = f"{self._noise_seed}/{self.global_rank}/{self.global_step}/{batch_idx}"
        return torch.Generator().manual_seed(random.Random(key).getrandbits(63))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        text, kind = self._text(batch), self._kind(batch)
        if self.teacher is None:
            loss = bridge_loss(
                self._net_fn(self.net, kind),
                batch["preview"],
                batch["target"],
                self.bridge,
                text,
                self._noise(batch_idx),
                batch.get("preview_kind"),  # the loss's exact_low_weight reads it, told to the net or not
            )
        else:  # the teacher's start point and K steps against the student's `steps` from it
            loss = distill_loss(
                self._net_fn(self.net, kind),
                self._net_fn(self.teacher.net, kind),
                self.teacher.sampler,
                self.distill.steps,
                batch["preview"],
                batch["target"],
                text,
                self._noise(batch_idx),
                self.distill.gt_weight,
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["target"].shape[0])
        if len(self._losses_first) < LOSS_WINDOW:
            self._losses_first.append(loss.detach())
        self._losses_last.append(loss.detach())
        return loss

    @property
    def loss_first(self) -> float | None:
        """Mean training loss over the first steps this process ran."""
        return float(torch.stack(self._losses_first).mean()) if self._losses_first else None

    @property
    def loss_last(self) -> float | None:
        """Mean training loss over the last steps this process ran."""
        return float(torch.stack(list(self._losses_last)).mean()) if self._losses_last else None

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # the EMA moves with the optimizer step, before any callback's on_train_batch_end: a checkpoint saved at
        # step N (ModelCheckpoint, a stop, a requeue) holds the EMA of step N, so a resume misses no update
        if self.ema is not None:
            self.ema.update(self.net)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:  # a top-level key: DeepSpeed keeps it in its client state, Lightning in the file
            checkpoint["ema"] = self.ema.state_dict()
        if self.teacher is not None:  # the teacher's weights are not saved, only which they were
            checkpoint["distill_teacher"] = self.teacher.fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        was = checkpoint.get("distill_teacher")
        if self.teacher is not None and was is not None and was != self.teacher.fingerprint:
            log.warning(
                "module.distill.teacher %s is not the teacher this run distilled until its checkpoint (weights sha256 "
                "%s..., then %s...): the resumed run distils another one",
                self.distill.teacher,
                self.teacher.fingerprint[:12],
                was[:12],
            )
        # checkpoints written before the EMA left the module keep it as ema.* entries of the state dict
        state = checkpoint.get("state_dict") or {}
        old = {k: state.pop(k) for k in [k for k in state if k.startswith("ema.")]}
        if self.ema is None:
            return
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        elif old:
            self.ema.load_state_dict(
                {
                    "state_dict": {k[len("ema.module.") :]: v for k, v in old.items() if k.startswith("ema.module.")},
                    "updates": int(old.get("ema.n_averaged", 1)),
                }
            )

    def configure_optimizers(self):
        o = self.optim
        opt = torch.optim.AdamW(self.net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.max_steps)) if self.trainer.max_steps > 0 else 10**9
        sched = lr_schedule(opt, o, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- validation -----------------------------------------------------------------------------
    @property
    def eval_net(self) -> Refiner:
        return self.ema.module if self.ema is not None else self.net

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        preview, target = batch["preview"].float(), batch["target"].float()  # metrics in float32
        text = self._text(batch)
        text = None if text is None else text.float()
        sampler = self.bridge.sampler()
        x_up = sampler.upsample(preview, tuple(target.shape[-2:]))  # (B, C, F, H, W)
        gen = torch.Generator().manual_seed(batch_idx)  # the same start noise at every validation
        refined = sampler.refine(self._net_fn(self.eval_net, self._kind(batch)), x_up, preview, text, gen)
        b = target.shape[0]
        self.log("val/mse_refiner", F.mse_loss(refined, target), sync_dist=True, batch_size=b)
        if self.teacher is not None:  # the teacher from the same start point (the same seed, the same draw)
            self.teacher.net.to(self.device)
            gen = torch.Generator().manual_seed(batch_idx)
            want = self.teacher.sampler.refine(
                self._net_fn(self.teacher.net, self._kind(batch)), x_up, preview, text, gen
            )
            self.log("val/mse_to_teacher", F.mse_loss(refined, want), sync_dist=True, batch_size=b)
        self.log("val/mse_upsample", F.mse_loss(x_up, target), sync_dist=True, batch_size=b)
        if batch_idx == 0 and self.global_rank == 0 and self.hparams.val_videos and self.hparams.decode_base:
            self._log_videos(
                x_up[: self.hparams.val_videos], refined[: self.hparams.val_videos], target[: self.hparams.val_videos]
            )

    def on_validation_epoch_end(self) -> None:
        m = self.trainer.callback_metrics
        if "val/mse_refiner" in m and "val/mse_upsample" in m:
            ratio = m["val/mse_refiner"] / m["val/mse_upsample"].clamp_min(1e-12)  # both already rank-averaged
            self.log("val/refiner_over_upsample", ratio, sync_dist=True)

    def _log_videos(self, x_up: torch.Tensor, refined: torch.Tensor, target: torch.Tensor) -> None:
        """Decode (upsampled preview | refined | target) side by side, write mp4, log to W&B if present."""
        from diffusers.utils import export_to_video

        from surf_train.base import BaseSpec
        from surf_train.base.vae import LatentDecoder, to_frames

        if self._decoder is None:  # the VAE alone: never the base model's transformer or text encoders
            self._decoder = LatentDecoder(BaseSpec.from_name(self.hparams.decode_base), self.device)
        spec = self._decoder.spec
        out_dir = Path(self.hparams.video_dir or "videos")
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(x_up.shape[0]):
            row = torch.cat([self._decoder.decode(x[i : i + 1]) for x in (x_up, refined, target)], dim=-1)
            frames = to_frames(row)[0]  # (frames, H, 3W, 3)
            path = out_dir / f"step{self.global_step:07d}_{i}.mp4"
            export_to_video(list(frames), str(path), fps=spec.fps)
            paths.append(str(path))
        if hasattr(self.logger, "log_video"):
            self.logger.log_video(
                "val/preview_refined_target", paths, step=self.global_step, format=["mp4"] * len(paths)
            )
