"""The base-model interface shared by pair generation, validation and generation.

A `BaseModel` wraps a diffusers pipeline (WanPipeline, HunyuanVideoPipeline): it encodes prompts,
gives the guided velocity (docs/method.md#flow-matching) exactly as its pipeline computes it (same timestep,
same CFG, same cache contexts), hands out the pipeline's own scheduler as a `Schedule`, and VAE-encodes/decodes with the
family's latent normalisation. Constants (geometry, native size) come from `conf/base/<name>.yaml`; the
scheduler and its shift come from the pipeline (`scheduler/` of a diffusers repository), which the yaml may
override (`shift`, `scheduler`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field

import torch

from surf_train.base import vae as vae_io
from surf_train.base.sampling import Schedule, Step, convert_scheduler, scheduler_shift, with_shift
from surf_train.base.spec import BaseSpec, LatentGeometry, latent_frames  # noqa: F401  (their home: base.spec)
from surf_train.common.dtypes import DTYPES
from surf_train.common.errors import ConfigError


def expert_at(timestep: torch.Tensor | float, boundary_timestep: float | None) -> str:
    """WanPipeline's rule: transformer (high noise) while t >= boundary_ratio * T, else transformer_2."""
    return "transformer" if boundary_timestep is None or bool(timestep >= boundary_timestep) else "transformer_2"


def negatives(negative_prompt: str | list[str], n: int) -> list[str]:
    """One negative prompt per prompt: a string repeated, or a list of n (diffusers' convention)."""
    negs = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negs) != n:
        raise ConfigError(f"negative_prompt: {len(negs)} negative prompts for {n} prompts")
    return negs


@dataclass
class Cond:
    """Encoded prompts for a batch: everything the transformer needs besides x and s."""

    embeds: torch.Tensor  # (B, L, D)
    negative: torch.Tensor | None = None  # (B, L, D), Wan CFG
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # family-specific (masks, pooled)

    def texts(self) -> torch.Tensor:
        """(B, L, D) embeddings as shards store them and the Refiner sees them, in training and at generation:
        padding positions zero. HunyuanVideo's encoders return non-zero padding with a mask; zeroed, the Refiner
        masks them (refiner.text_padding_mask) and the shard drops them."""
        mask = self.extra.get("mask")  # (B, L), 1 for real tokens
        return self.embeds if mask is None else self.embeds * mask[:, :, None].to(self.embeds.dtype)

    def repeat(self, n: int) -> Cond:
        """Each prompt's tensors n times in a row (B * n first), as diffusers' num_videos_per_prompt repeats them."""
        if n == 1:
            return self
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return Cond(rep(self.embeds), rep(self.negative), {k: rep(v) for k, v in self.extra.items()})

    def text(self, i: int) -> torch.Tensor:
        """(L, D) embeddings of prompt i as stored in shards (see texts)."""
        return self.texts()[i]


@dataclass
class Acceleration:
    """Acceleration plug-ins on the base model, all off by default (noise reshifting composes with each)."""

    cache_threshold: float | None = None  # diffusers' FirstBlockCache (enable_cache) with this threshold; None: off
    cfg_stop: int | None = None  # no CFG from this step of the schedule on (0: none); None: CFG at every step
    cfg_low: bool = True  # False: no CFG in the low-resolution steps after the switch

    def check(self, cfg_branch: bool = True, where: str = "") -> None:
        if self.cache_threshold is not None and not self.cache_threshold > 0:
            raise ConfigError(f"{where}cache_threshold={self.cache_threshold} must be > 0 (or null: no cache)")
        if self.cfg_stop is not None and self.cfg_stop < 0:
            raise ConfigError(f"{where}cfg_stop={self.cfg_stop} must be >= 0 (or null: CFG at every step)")
        if not cfg_branch and (self.cfg_stop is not None or not self.cfg_low):
            raise ConfigError(f"{where}CFG truncation needs a CFG branch; this base model embeds its guidance")

    def cfg_at(self, step: Step) -> bool:
        """Whether the guided (two-branch) velocity is computed at this step."""
        return (self.cfg_stop is None or step.index < self.cfg_stop) and (self.cfg_low or step.stage != "low")


@dataclass
class Meter:
    """The work the transformer actually did, by latent (h, w), per sample (a forward of a batch of B counts B)."""

    forwards: Counter = field(default_factory=Counter)  # (h, w) -> sample forwards (CFG branches count)
    blocks: Counter = field(default_factory=Counter)  # ((h, w), block list name) -> sample blocks run
    experts: Counter = field(default_factory=Counter)  # expert ("transformer", "transformer_2") -> sample forwards

    def reset(self) -> None:
        self.forwards.clear()
        self.blocks.clear()
        self.experts.clear()

    def block_fraction(self, hw: tuple[int, int] | None = None, sizes: dict[str, int] | None = None) -> float:
        """Blocks run / blocks a full forward runs, over the forwards at `hw` (None: all)."""
        keys = [k for k in self.forwards if hw is None or k == hw]
        run = sum(n for (k, _), n in self.blocks.items() if k in keys)
        full = sum(self.forwards[k] for k in keys) * sum((sizes or {}).values())
        return run / full if full else 1.0


BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks")  # Wan; HunyuanVideo double, single
EXPERTS = ("transformer", "transformer_2")  # Wan 2.2 A14B: the high-noise expert, the low-noise one


class BaseModel(ABC):
    """A frozen flow-matching video DiT; subclasses implement one family each."""

    cfg_branch = True  # guidance by a second (negative) transformer call; False: embedded in one call
    takes_embeds = False  # encode_prompt takes prompt_embeds / negative_prompt_embeds (its text is one tensor)

    # how the family's pipeline sets its scheduler: set_timesteps(N), or custom sigmas linspace(1, 0, N + 1)[:-1]
    custom_sigmas = False

    def __init__(self, spec: BaseSpec, pipe, device: torch.device):
        self.spec, self.pipe, self.device = spec, pipe, device
        net = pipe.transformer  # None in a pipeline of the text encoders alone (it can only encode prompts)
        self.dtype = net.dtype if net is not None else getattr(pipe.text_encoder, "dtype", torch.float32)
        self.geometry = spec.geometry
        if pipe.scheduler is not None:
            try:  # the pipeline keeps the scheduler the samplers step, so pipe(...) and they agree
                pipe.scheduler = with_shift(convert_scheduler(pipe.scheduler, spec.scheduler), spec.shift)
            except ConfigError as e:
                raise ConfigError(f"base model {spec.model_id}: {e}") from None
        pipe.set_progress_bar_config(disable=True)
        self.meter, self._hw, self._batch, self._counting = Meter(), None, 1, False
        self.attention_kwargs: dict | None = None  # passed to the transformer as the pipeline passes its own
        # the experts the pipeline holds (one, or Wan 2.2's two), each with its own cache hooks and state
        self.experts = {n: getattr(pipe, n) for n in EXPERTS if getattr(pipe, n, None) is not None}
        # transformer blocks per list (FirstBlockCache skips all but the first; FLOPs of each list: flops.block_flops)
        self.block_lists = {} if net is None else self._blocks(net)
        for m in (*self.experts.values(), pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if m is not None:
                m.requires_grad_(False).eval()
        if net is not None:
            self._check_loaded()
            self._check_experts()

    @staticmethod
    def _blocks(net: torch.nn.Module) -> dict[str, int]:
        return {n: len(m) for n, m in net.named_children() if n in BLOCK_LISTS and isinstance(m, torch.nn.ModuleList)}

    def _check_loaded(self) -> None:
        cfg = self.pipe.transformer.config
        got = (cfg.in_channels, self.pipe.vae_scale_factor_temporal, self.pipe.vae_scale_factor_spatial, *self._patch())
        want = (self.spec.channels, self.spec.stride_t, self.spec.stride_s, self.spec.patch_t, self.spec.patch_s)
        if got != want:
            raise ConfigError(
                f"base model {self.spec.model_id}: loaded (channels, stride_t, stride_s, patch_t, "
                f"patch_s)={got} but conf/base/{self.spec.name}.yaml says {want}"
            )

    def _check_experts(self) -> None:
        """The loaded pipeline's experts and boundary_ratio are the ones conf/base names; both experts alike."""
        where = f"base model {self.spec.model_id}"
        got = (self.pipe.config.get("boundary_ratio"), len(self.experts))
        want = (self.spec.boundary, 1 if self.spec.boundary is None else 2)
        if got != want:
            raise ConfigError(
                f"{where}: loaded (boundary_ratio, experts)={got} but conf/base/{self.spec.name}.yaml says {want}"
            )
        if "transformer_2" in self.experts:
            a, b = self.pipe.transformer.config, self.experts["transformer_2"].config
            keys = ("in_channels", "out_channels", "patch_size")
            if [a[k] for k in keys] != [b[k] for k in keys] or self._blocks(self.experts["transformer_2"]) != (
                self.block_lists
            ):
                raise ConfigError(f"{where}: transformer_2 differs from transformer in {keys} or its blocks")

    @classmethod
    def load(cls, spec: BaseSpec, device: torch.device) -> BaseModel:
        """Tiny model from configs when spec.pretrained is None, else diffusers from_pretrained (the VAE as
        vae.load_vae_module loads it: Wan's stays float32, as in its model card; the rest in spec.dtype)."""
        if spec.pretrained is None:
            from surf_train.base.tiny import TINY_BUILDS

            pipe = cls.tiny_pipeline() if spec.tiny is None else TINY_BUILDS[spec.tiny][0]()
        else:
            pipe = cls.pipeline_class().from_pretrained(
                spec.source, vae=vae_io.load_vae_module(spec), revision=spec.revision, dtype=DTYPES[spec.dtype]
            )
        pipe.to(device)  # dtypes were set at build/load time (diffusers keeps some modules in float32)
        return cls(spec, pipe, device)

    # --- family-specific -------------------------------------------------------------------
    pipeline_name: str  # the family's diffusers pipeline class, e.g. "WanPipeline"
    tiny_name: str  # the builder of its tiny download-free pipeline in surf_train.base.tiny

    @classmethod
    def pipeline_class(cls) -> type:
        import diffusers  # on use: diffusers is slow to import

        return getattr(diffusers, cls.pipeline_name)

    @classmethod
    def tiny_pipeline(cls):
        from surf_train.base import tiny

        return getattr(tiny, cls.tiny_name)()

    @abstractmethod
    def _patch(self) -> tuple[int, int]:
        """(patch_t, patch_s) of the loaded transformer."""

    @abstractmethod
    def encode_prompt(self, prompts: list[str], max_sequence_length: int | None = None) -> Cond:
        """Text conditioning for a batch of prompts (with the negative prompt where CFG needs it);
        max_sequence_length None: the base model's."""

    @abstractmethod
    def _forward(self, x: torch.Tensor, step: Step, cond: Cond, guidance: float) -> torch.Tensor:
        """Guided transformer output for x in the model's dtype, computed as the family's pipeline does."""

    # --- shared ----------------------------------------------------------------------------
    @property
    def flops_config(self) -> dict:
        """The transformer's config as the cost model reads it (surf_train.cost), with how the pipeline runs it."""
        return dict(self.pipe.transformer.config)

    def check_grid(self, latent_hw: tuple[int, int], frames: int) -> None:  # noqa: B027 (a hook: no-op default)
        """Family limits on the token grid beyond divisibility (none by default)."""

    @property
    def scheduler(self):
        """The pipeline's scheduler (a template: the samplers step fresh copies)."""
        return self.pipe.scheduler

    @property
    def shift(self) -> float:
        return scheduler_shift(self.pipe.scheduler)

    def schedule(self, steps: int, shift: float | None = None) -> Schedule:
        """The pipeline's `steps`-step schedule (shift: None = the scheduler's own)."""
        return Schedule(with_shift(self.pipe.scheduler, shift), steps, self.custom_sigmas)

    def enable_cache(self, threshold: float) -> None:
        """diffusers' FirstBlockCache on every expert; from now on the Meter counts the blocks that really run."""
        from diffusers.hooks import FirstBlockCacheConfig

        if self._cache_on():
            raise ConfigError(f"base model {self.spec.model_id}: a cache is already enabled")
        if not self._counting:  # under the hooks, so a block the cache skips is never counted
            for net in self.experts.values():
                for name in self.block_lists:
                    for block in getattr(net, name):
                        block.forward = self._counted(block.forward, name)
            self._counting = True
        for net in self.experts.values():  # one hook set, so one cache state, per expert (as the pipeline's)
            net.enable_cache(FirstBlockCacheConfig(threshold=threshold))

    def _cache_on(self) -> bool:
        return getattr(self.pipe.transformer, "is_cache_enabled", False)

    def disable_cache(self) -> None:
        for net in self.experts.values():
            if getattr(net, "is_cache_enabled", False):
                net.disable_cache()

    def accelerate(self, acc: Acceleration) -> None:
        """Install the model-side plug-ins of `acc` (the cache); CFG truncation is applied by velocity_fn."""
        acc.check(self.cfg_branch)
        self.disable_cache()
        if acc.cache_threshold is not None:
            self.enable_cache(acc.cache_threshold)

    def _counted(self, forward, name: str):
        def run(*a, **k):
            self.meter.blocks[(self._hw, name)] += self._batch
            return forward(*a, **k)

        return run

    @property
    def boundary_timestep(self) -> float | None:
        """boundary * num_train_timesteps, as WanPipeline computes it; None: one expert."""
        b = self.spec.boundary
        return None if b is None else b * self.pipe.scheduler.config.num_train_timesteps

    def expert(self, timestep: torch.Tensor | float) -> str:
        """The expert WanPipeline runs at a scheduler timestep."""
        return expert_at(timestep, self.boundary_timestep)

    def guidances(self, guidance: float | None = None, guidance_2: float | None = None) -> tuple[float, float]:
        """(transformer's, transformer_2's) guidance; None: the base model's (guidance_2's own default: guidance).

        CFG runs only where the high-noise guidance asks for it (WanPipeline's do_classifier_free_guidance reads
        guidance_scale alone), so guidance <= 1 turns it off for both experts."""
        g = self.spec.guidance if guidance is None else guidance
        g2 = self.spec.guidance_2 if guidance_2 is None else guidance_2
        return g, ((g if g2 is None else g2) if g > 1.0 else 1.0)

    def _call(self, name: str, step: Step, **kw) -> torch.Tensor:
        """One forward of the expert the step's timestep selects, inside the cache context the pipeline opens."""
        expert = self.expert(step.timestep)
        net = self.experts[expert]
        self._hw, self._batch = tuple(kw["hidden_states"].shape[-2:]), kw["hidden_states"].shape[0]
        self.meter.forwards[self._hw] += self._batch
        self.meter.experts[expert] += self._batch
        if not self._counting:  # no hooks: every block runs
            for list_name, n in self.block_lists.items():
                self.meter.blocks[(self._hw, list_name)] += n * self._batch
        if self.attention_kwargs:  # e.g. {"scale": ...} for LoRA layers, as the family's pipeline passes it
            kw["attention_kwargs"] = self.attention_kwargs
        if not getattr(net, "is_cache_enabled", False):
            return net(**kw, return_dict=False)[0]
        ctx = {
            "step_index": step.index,
            "num_inference_steps": step.steps,
            "sigma": step.sigma,
            "timestep": step.timestep,
        }
        with net.cache_context(f"{name}:{step.stage}", **ctx):  # one state per expert, branch and latent size
            return net(**kw, return_dict=False)[0]

    @torch.no_grad()
    def velocity(
        self,
        x: torch.Tensor,
        s: float | Step,
        cond: Cond,
        guidance: float | None = None,
        guidance_2: float | None = None,
    ) -> torch.Tensor:
        """Guided velocity v = eps - x0 for x (B, C, F, H, W); returned in float32.

        s: a sampler's `Step` (its timestep goes to the transformer as the pipeline passes it, and selects the
        expert), or a bare noise level (timestep s * 1000, the schedulers' scale). guidance/guidance_2: see
        `guidances`.
        """
        step = s if isinstance(s, Step) else Step(float(s), torch.tensor(float(s) * 1000.0), 0, 1)
        g, g2 = self.guidances(guidance, guidance_2)
        if step.start and self._cache_on():
            for net in self.experts.values():  # a new sampler run: nothing cached may carry over
                net._reset_stateful_cache()
        g = g if self.expert(step.timestep) == "transformer" else g2
        return self._forward(x.to(self.device, self.dtype), step, cond, g).float()

    def velocity_fn(
        self,
        cond: Cond,
        guidance: float | None = None,
        acc: Acceleration | None = None,
        guidance_2: float | None = None,
    ):
        """The callable `velocity(x, step)` that the samplers in surf_train.base.sampling take.

        acc: CFG truncation (the conditional branch alone where `acc.cfg_at(step)` is false).
        """
        if acc is None or (acc.cfg_stop is None and acc.cfg_low):
            return lambda x, step: self.velocity(x, step, cond, guidance, guidance_2)
        acc.check(self.cfg_branch)
        return lambda x, step: (
            self.velocity(x, step, cond, guidance, guidance_2)
            if acc.cfg_at(step)
            else self.velocity(x, step, cond, 1.0)
        )

    @torch.no_grad()
    def vae_encode(
        self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, frames, H, W) in [-1, 1] -> normalised latent (B, C, F, H/s, W/s) float32."""
        self.geometry.check(video.shape[2], video.shape[3], video.shape[4], "video")
        return vae_io.encode(self.spec.family, self.pipe.vae, video, self.device, sample, generator)

    @torch.no_grad()
    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent (B, C, F, H, W) -> video (B, 3, frames, H*s, W*s) in [-1, 1] float32."""
        return vae_io.decode(self.spec.family, self.pipe.vae, latent, self.device)
