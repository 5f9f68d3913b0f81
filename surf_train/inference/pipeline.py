"""`SurfPipeline`: a diffusers pipeline of a base model's components plus the Refiner (docs/generation.md).

    pipe = SurfPipeline.from_surf("tiny", "runs/tiny/refiner")       # a conf/base name + an exported Refiner
    video = pipe("a red ball rolling", generator=torch.Generator().manual_seed(0)).frames[0]  # (F, H, W, 3)
    pipe.save_pretrained("surf_tiny"); SurfPipeline.from_pretrained("surf_tiny")
    SurfPipeline(**WanPipeline.from_pretrained(...).components, refiner=Refiner.from_pretrained(...))

The components are the base pipeline's (WanPipeline, HunyuanVideoPipeline or HunyuanVideo15Pipeline, its guider
included) and `refiner`; model_index.json also holds `base_spec` (the conf/base record: geometry, native size,
guidance, prompts' settings; read off the components when not given, `base.components`) and `bridge` (the
Refiner's sampler settings from its surf.json). A call runs the same code as `surf-generate`: the base-model adapter
(its pipeline's own scheduler, CFG, cache), `sampling.preview_sample` and the Refiner's `RefinerSampler`, with
diffusers' conventions for generators, embeddings, `num_videos_per_prompt` and step-end callbacks (WanPipeline's).
`clock` (a StageClock) times each stage; `surf_train.generate` and `benchmarks/bench_generate.py` read their
reports from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLWan,
    ClassifierFreeGuidance,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)
from diffusers.utils import BaseOutput
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from surf_train.base import Acceleration, BaseModel, BaseSpec, adapter_class, latent_frames
from surf_train.base.components import family_of, spec_from_pipe
from surf_train.base.sampling import PreviewPlan, preview_sample, randn, sample
from surf_train.base.toy_vae import PixelShuffleVAE
from surf_train.common.errors import ConfigError
from surf_train.inference.clock import StageClock
from surf_train.inference.conventions import callback_inputs, realign, step_end, write_module_file
from surf_train.inference.plan import MODES, SurfPlan, check_call, check_target, default_prefix, plan_sizes
from surf_train.models.refiner import Refiner
from surf_train.models.sampler import RefinerSampler, takes_kind

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class SurfPipelineOutput(BaseOutput):
    """frames: np (B, F, H, W, 3) in [0, 1], a list of lists of PIL images, a (B, F, 3, H, W) tensor, or the
    latent (B, C, F, H, W) for output_type="latent" (as WanPipelineOutput); plan: what the call ran."""

    frames: Any
    plan: SurfPlan | None = None


def _spec_dict(spec: BaseSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["native_size"] = list(d["native_size"])
    return d


def _spec(base_spec: dict | str | BaseSpec) -> BaseSpec:
    if isinstance(base_spec, str):
        return BaseSpec.from_name(base_spec)
    return base_spec if isinstance(base_spec, BaseSpec) else BaseSpec.from_dict(base_spec)


class SurfPipeline(DiffusionPipeline):
    """SURF generation: base-model prefix, noise-reshifted preview, Refiner to the target size, VAE decode."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->transformer_2->refiner->vae"
    _optional_components = ["refiner", "text_encoder_2", "tokenizer_2", "transformer_2", "guider"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        text_encoder: PreTrainedModel | None,
        transformer: WanTransformer3DModel | HunyuanVideoTransformer3DModel | HunyuanVideo15Transformer3DModel | None,
        vae: AutoencoderKLWan | AutoencoderKLHunyuanVideo | AutoencoderKLHunyuanVideo15 | PixelShuffleVAE | None,
        scheduler: FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler | DPMSolverMultistepScheduler | None,
        refiner: Refiner | None = None,
        text_encoder_2: PreTrainedModel | None = None,
        tokenizer_2: PreTrainedTokenizerBase | None = None,
        base_spec: dict | str | BaseSpec | None = None,  # None: read off the components (base.components)
        bridge: dict | None = None,  # None: the one the Refiner came with (its `surf_bridge`), else the defaults
        transformer_2: WanTransformer3DModel | None = None,
        base_options: dict | None = None,  # the family pipeline's own options, e.g. WanPipeline's expand_timesteps
        guider: ClassifierFreeGuidance | None = None,
    ):
        super().__init__()
        spec = None if base_spec is None else _spec(base_spec)
        family = spec.family if spec is not None else family_of(transformer, text_encoder_2, guider)
        names = {
            "tokenizer": tokenizer,
            "text_encoder": text_encoder,
            "transformer": transformer,
            "vae": vae,
            "scheduler": scheduler,
        }
        if family in ("hunyuan", "hunyuan15"):  # a second text encoder; 1.5 also guides by a guider
            names.update(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        if family == "hunyuan15":
            names.update(guider=guider)
        options = dict(base_options or {})
        if family == "wan" and (transformer_2 is not None or (spec is not None and spec.boundary is not None)):
            names["transformer_2"] = transformer_2  # Wan 2.2 A14B: the low-noise expert and the boundary
            if spec is not None:  # conf/base's, checked by the adapter
                options["boundary_ratio"] = spec.boundary
        # the family's own pipeline around the same modules: the adapter computes the velocity exactly as it does
        adapter = adapter_class(family)
        family_pipe = adapter.pipeline_class()(**names, **options)
        spec = spec or spec_from_pipe(family, family_pipe, options)
        modules = [m for m in (transformer, text_encoder, vae) if isinstance(m, torch.nn.Module)]
        self.base = adapter(spec, family_pipe, modules[0].device if modules else torch.device("cpu"))
        unused = {"text_encoder_2": None, "tokenizer_2": None, "transformer_2": None, "guider": None}
        self.register_modules(**{**unused, **names, "scheduler": self.base.pipe.scheduler}, refiner=refiner)
        if bridge is None:  # the sampler a Refiner travels with between pipelines (pipe.components holds no config)
            bridge = getattr(refiner, "surf_bridge", None) or {}
        if refiner is not None:
            refiner.surf_bridge = dict(bridge)
        self.register_to_config(base_spec=_spec_dict(spec), bridge=dict(bridge), base_options=base_options or {})
        self._guidance_scale, self._guidance_scale_2, self._num_timesteps = None, None, 0
        self._attention_kwargs, self._current_timestep = None, None
        for m in (transformer, transformer_2, vae, text_encoder, text_encoder_2, refiner):
            if isinstance(m, torch.nn.Module):  # loaded or built, the same numerics (see realign)
                realign(m)
        if refiner is not None:
            refiner.eval().requires_grad_(False)
            if refiner.cfg.in_channels != spec.channels:
                raise ConfigError(
                    f"Refiner works on {refiner.cfg.in_channels}-channel latents but base model "
                    f"{spec.name} has {spec.channels}"
                )

    # --- saving: a module file beside model_index.json lets DiffusionPipeline load the directory ---------------
    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        """model_index.json with `_class_name` [module, class] and that module (MODULE_FILE) beside it, diffusers'
        route for a pipeline class outside diffusers: DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)
        (docs/generation.md). save_pretrained calls this before it uploads."""
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_module_file(save_directory)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """model_index.json as SurfPipeline.from_pretrained reads it: the [module, class] `_class_name` names this
        class, so loading with it runs no code from the directory."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][1]
        return out

    # --- diffusers' pipeline state, read by step-end callbacks (as WanPipeline's) -------------------------------
    @property
    def guidance_scale(self) -> float | None:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.base.cfg_branch and (self._guidance_scale or 0.0) > 1.0

    @property
    def num_timesteps(self) -> int:
        """Steps of the last call that call callback_on_step_end: the base model's, then the Refiner's."""
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def attention_kwargs(self) -> dict | None:
        return self._attention_kwargs

    @property
    def spec(self) -> BaseSpec:
        return self.base.spec

    @property
    def sampler(self) -> RefinerSampler:
        """The Refiner's sampler as its export records it (the `bridge` config entry)."""
        return RefinerSampler.from_bridge(self.config.bridge)

    @classmethod
    def from_base(cls, model: BaseModel, refiner=None, bridge: dict | None = None) -> SurfPipeline:
        """Around a loaded base-model adapter (its modules, not copies); the Refiner moved to its device and dtype."""
        p = model.pipe
        if refiner is not None:  # norms and adaLN tables stay float32
            refiner = refiner.to(model.device).to_dtype(model.dtype)
        return cls(
            p.tokenizer,
            p.text_encoder,
            p.transformer,
            p.vae,
            p.scheduler,
            refiner,
            getattr(p, "text_encoder_2", None),
            getattr(p, "tokenizer_2", None),
            model.spec,
            bridge,
            transformer_2=getattr(p, "transformer_2", None),
            base_options={k: v for k, v in p.config.items() if not k.startswith("_") and k not in p.components},
            guider=getattr(p, "guider", None),
        )

    @classmethod
    def from_surf(
        cls,
        base: str | BaseSpec,
        refiner: str | None = None,
        device: str = "auto",
        dtype: str | None = None,
        force: bool = False,
    ) -> SurfPipeline:
        """A conf/base model (tiny, toy, wan2.1_t2v_14b, ...) and an exported Refiner directory (or None)."""
        from surf_train.base import load_base_model
        from surf_train.models.loading import check_base, load_refiner

        spec = BaseSpec.from_name(base) if isinstance(base, str) else base
        if dtype is not None:
            spec.dtype = dtype
        net, bridge = None, {}
        if refiner is not None:
            net, meta = load_refiner(refiner)
            bridge = meta.get("bridge", {})
            warning = check_base(meta, spec, f"Refiner {refiner}", force)
            if warning:
                import logging

                logging.getLogger("surf_train").warning("%s", warning)
        return cls.from_base(load_base_model(spec, device), net, bridge)

    def compile_repeated_blocks(self, **kwargs) -> None:
        """Regional compilation of the base transformer(s) and the Refiner: each repeated block is compiled with
        torch.compile (kwargs, e.g. fullgraph=True) once per block class and shape, and reused by every block."""
        for m in (self.transformer, self.transformer_2, self.refiner):
            if m is not None:
                m.compile_repeated_blocks(**kwargs)

    def plan(
        self,
        height=None,
        width=None,
        num_frames=None,
        num_inference_steps: int = 20,
        switch: int = 5,
        prefix_size=(None, None),
        preview_size=(None, None),
        refiner_steps: int | None = None,
        mode: str = "surf",
        shift: float | None = None,
    ) -> SurfPlan:
        """Sizes, schedule and stage names of a call; ConfigError, naming the argument, for settings the models
        cannot run."""
        sizes = dict(height=height, width=width, num_frames=num_frames, prefix_height=prefix_size[0])
        sizes |= dict(prefix_width=prefix_size[1], preview_height=preview_size[0], preview_width=preview_size[1])
        check_call(mode, num_inference_steps, switch, refiner_steps, **sizes)
        missing = [n for n in ("transformer", "vae", "scheduler") if getattr(self, n, None) is None]
        if missing:
            raise ConfigError(f"this SurfPipeline has no {', '.join(missing)}: it can only encode prompts")
        if mode == "surf" and self.refiner is None:
            raise ConfigError("mode 'surf' needs a Refiner (this pipeline has none: use 'preview' or 'baseline')")
        spec = self.spec
        frames = num_frames or spec.native_frames
        sizes = plan_sizes(spec, height, width, tuple(prefix_size), tuple(preview_size), mode, switch)
        check_target(spec, frames, sizes["target"])
        s = spec.stride_s
        lat = {k: (v[0] // s, v[1] // s) for k, v in sizes.items()}
        f_lat = latent_frames(frames, spec.stride_t)
        for k in ("target", "prefix", "preview"):
            self.base.check_grid(lat[k], f_lat)
        schedule = self.base.schedule(num_inference_steps, shift)  # the pipeline's own scheduler (shift: override)
        k_ref = self.sampler.steps if refiner_steps is None else refiner_steps
        # stage of each base-model call, by the latent size it runs at (the prefix wins if sizes coincide)
        names = (
            {lat["target"]: "full_res"} if mode == "baseline" else {lat["preview"]: "low_res", lat["prefix"]: "prefix"}
        )
        return SurfPlan(mode, sizes, frames, lat, f_lat, schedule, k_ref if mode == "surf" else 0, names)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 20,
        switch: int = 5,
        preview_height: int | None = None,
        preview_width: int | None = None,
        prefix_height: int | None = None,
        prefix_width: int | None = None,
        refiner_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (WanPipeline's default)
        max_sequence_length: int | None = None,
        mode: str = "surf",
        rule: str = "pool",
        down: str = "area",
        shift: float | None = None,
        acceleration: Acceleration | None = None,
        clock: StageClock | None = None,
    ):
        """Generate videos (sizes in pixels; None: the base model's defaults, preview half the target).

        switch: base-model steps at the prefix size; refiner_steps None: the K the Refiner was trained with;
        guidance_scale None: the base model's; negative_prompt None: its conf/base one (CFG families only);
        latents: start noise (B, C, F, h, w) at the prefix size (the target size for mode="baseline");
        acceleration: the base model's cache and CFG truncation (None: off); max_sequence_length None: the base
        model's. generator (one, or one per video), prompt_embeds, num_videos_per_prompt, callback_on_step_end and
        attention_kwargs follow WanPipeline's conventions (docs/generation.md#diffusers-conventions)."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type={output_type!r}: choose from {OUTPUT_TYPES}")
        check_call(mode, num_inference_steps, switch, refiner_steps, rule, down)
        if num_videos_per_prompt < 1:
            raise ConfigError(f"num_videos_per_prompt={num_videos_per_prompt} must be >= 1")
        names = callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        prefix, preview = (prefix_height, prefix_width), (preview_height, preview_width)
        steps = (num_inference_steps, switch)
        plan = self.plan(height, width, num_frames, *steps, prefix, preview, refiner_steps, mode, shift)
        acc = acceleration or Acceleration()
        self._prepare(acc, attention_kwargs)
        clock = clock or StageClock(self.base.device)
        texts = (prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, max_sequence_length)
        cond, text = self._encode(texts, num_videos_per_prompt, mode, clock)
        self._guidance_scale = self.spec.guidance if guidance_scale is None else guidance_scale
        self._guidance_scale_2, self._num_timesteps = guidance_scale_2, plan.schedule.steps + plan.refiner_steps
        after = step_end(self, callback_on_step_end, names, cond)
        try:
            noise = self._start_noise(plan, cond.embeds.shape[0], latents, generator)
            latent = self._sample(plan, cond, text, noise, acc, (switch, rule, down), generator, after, clock)
        finally:
            self.base.attention_kwargs, self._current_timestep = None, None
        frames = latent if output_type == "latent" else self._decode(latent, output_type, clock)
        self.maybe_free_model_hooks()
        return SurfPipelineOutput(frames=frames, plan=plan) if return_dict else (frames,)

    def _sample(self, plan, cond, text, noise, acc, reshift, generator, after, clock: StageClock) -> torch.Tensor:
        """The base model's steps (and the Refiner's, mode "surf") from the start noise -> the output latent."""
        model = self.base
        model.meter.reset()

        def velocity(x, step):  # the guidance as it stands (a callback may change it, as WanPipeline reads it)
            return model.velocity_fn(cond, self._guidance_scale, acc, self._guidance_scale_2)(x, step)

        vel = clock.wrap(velocity, lambda x: plan.names[tuple(x.shape[-2:])])
        if plan.mode == "baseline":
            return clock.span("sampler", sample, vel, noise, plan.schedule, after)  # the pipeline's own output
        return self._preview_and_refine(plan, vel, noise, text, reshift, generator, after, clock)

    def _prepare(self, acc: Acceleration, attention_kwargs: dict | None) -> None:
        """The adapter follows the modules' device and dtype (after pipe.to(...)), takes the acceleration and the
        transformer's attention_kwargs."""
        model = self.base
        model.device, model.dtype = self.transformer.device, self.transformer.dtype
        try:
            model.accelerate(acc)
        except ConfigError as e:
            raise ConfigError(f"acceleration: {e}") from None
        self._attention_kwargs = model.attention_kwargs = attention_kwargs

    def _decode(self, latent: torch.Tensor, output_type: str, clock: StageClock):
        video = clock.time("decode", self.base.vae_decode, latent)  # (B, 3, frames, H, W) in [-1, 1]
        return self.base.pipe.video_processor.postprocess_video(video, output_type=output_type)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        """As WanPipeline.encode_prompt: (prompt_embeds, negative_prompt_embeds), each (B * n, L, D) with each
        prompt's n in a row, the negative None without CFG; for a CFG family whose text is one tensor (Wan)."""
        if not self.base.takes_embeds:
            raise ConfigError(f"encode_prompt: {self.spec.family} has more text tensors than prompt_embeds")
        texts = (prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, max_sequence_length)
        cond = self._cond(*texts).repeat(num_videos_per_prompt)
        prompt_embeds = cond.embeds.to(device=device, dtype=dtype)
        negative_prompt_embeds = cond.negative if do_classifier_free_guidance else None
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        return prompt_embeds, negative_prompt_embeds

    def _cond(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, max_sequence_length):
        """The base model's conditioning of prompts or of given embeddings (ConfigError naming what is wrong)."""
        model = self.base
        if (prompt is None) == (prompt_embeds is None):
            raise ConfigError("give either prompt or prompt_embeds")
        if negative_prompt is not None and not model.cfg_branch:
            raise ConfigError(f"negative_prompt: {model.spec.family} embeds its guidance (no negative branch)")
        kw = {"max_sequence_length": max_sequence_length}
        if negative_prompt is not None:
            kw["negative_prompt"] = negative_prompt
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            if not model.takes_embeds:
                raise ConfigError(f"prompt_embeds: {model.spec.family} needs its other text tensors too; give prompt")
            if prompt_embeds is None:
                raise ConfigError("negative_prompt_embeds needs prompt_embeds")
            kw |= {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        if prompt is not None and self.text_encoder is None:
            raise ConfigError("prompt: this SurfPipeline has no text encoder; give prompt_embeds")
        model.device = self.text_encoder.device if self.text_encoder is not None else model.device
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        return model.encode_prompt(prompts, **kw)

    def _encode(self, texts: tuple, n: int, mode: str, clock: StageClock):
        """The base model's conditioning, each prompt's n times in a row, and the Refiner's text (B * n, L, D)
        (None without a text-conditioned Refiner). texts: prompt, negative prompt, their embeddings, text length."""
        model, net = self.base, self.refiner if mode == "surf" else None
        cond = clock.time("text", self._cond, *texts).repeat(n)
        if model.cfg_branch and cond.negative is None and self.text_encoder is None:
            raise ConfigError("negative_prompt_embeds: CFG needs them when the pipeline has no text encoder")
        text = cond.texts().float() if net is not None and net.cfg.text_dim else None  # as stored
        if text is not None and text.shape[-1] != net.cfg.text_dim:
            raise ConfigError(
                f"Refiner expects {net.cfg.text_dim}-wide text embeddings, {model.spec.name} gives {text.shape[-1]}"
            )
        return cond, text

    def _start_noise(self, plan: SurfPlan, b: int, latents, generator) -> torch.Tensor:
        """(B, C, F, h, w) start noise at the prefix size (the target size for mode="baseline")."""
        start = "target" if plan.mode == "baseline" else "prefix"
        shape = (b, self.spec.channels, plan.f_lat, *plan.lat[start])
        if latents is not None and tuple(latents.shape) != shape:
            raise ConfigError(f"latents {tuple(latents.shape)}: expected {shape} (the {start} size)")
        return (randn(shape, generator).cpu() if latents is None else latents.float()).to(self.base.device)

    def _preview_and_refine(self, plan, vel, noise, text, reshift, generator, after, clock) -> torch.Tensor:
        """The preview with noise reshifting (`reshift`: switch, rule, down), upsampled, then refined (mode "surf")
        -> target latent."""
        model, lat, (switch, rule, down) = self.base, plan.lat, reshift
        b, c = noise.shape[:2]
        pp = PreviewPlan(plan.schedule, switch=switch, preview_size=lat["preview"], rule=rule, down=down)
        fresh = randn((b, c, plan.f_lat, *lat["preview"]), generator).cpu().to(model.device)
        preview = clock.span("sampler", preview_sample, vel, noise, pp, fresh, after)
        sampler = self.sampler
        x_up = clock.span("upsample", sampler.upsample, preview, lat["target"])
        if plan.mode == "preview":
            return x_up
        net, dt = self.refiner, model.dtype
        kind = {"preview_kind": "generated"} if takes_kind(net) else {}  # the base model's own preview

        def ref_fn(x, t, cnd, txt):
            txt = None if txt is None else txt.to(dt)
            return net(x.to(dt), t.to(dt), cnd.to(dt), txt, return_dict=False, **kind)[0].float()

        sampler = sampler.override(steps=plan.refiner_steps)
        return clock.time("refine", sampler.refine, ref_fn, x_up, preview, text, generator, after)


__all__ = [
    "SurfPipeline",
    "SurfPipelineOutput",
    "SurfPlan",
    "StageClock",
    "default_prefix",
    "plan_sizes",
    "MODES",
    "OUTPUT_TYPES",
]
