"""`SurfPipeline`: a diffusers pipeline of a base model's components plus the Refiner (docs/generation.md).

    pipe = SurfPipeline.from_surf("tiny", "runs/tiny/refiner")       # a conf/base name + an exported Refiner
    video = pipe("a red ball rolling", generator=torch.Generator().manual_seed(0)).frames[0]  # (F, H, W, 3)
    pipe.save_pretrained("surf_tiny"); SurfPipeline.from_pretrained("surf_tiny")

The components are the base pipeline's (WanPipeline, HunyuanVideoPipeline or HunyuanVideo15Pipeline, its guider
included) and `refiner`; model_index.json also
holds `base_spec` (the conf/base record: geometry, native size, guidance, prompts' settings) and `bridge` (the
Refiner's sampler settings from its surf.json). A call runs the same code as `surf-generate`: the base-model adapter
(its pipeline's own scheduler, CFG, cache), `sampling.preview_sample` and the Refiner's `RefinerSampler`.
`clock` (a StageClock) times each stage; `surf_train.generate` and `benchmarks/bench_generate.py` read their
reports from it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from surf_train.base import Acceleration, BaseModel, BaseSpec, adapter_class, latent_frames
from surf_train.base.sampling import DOWN_MODES, RULES, PreviewPlan, Schedule, preview_sample, sample
from surf_train.common.errors import ConfigError
from surf_train.models.sampler import RefinerSampler

MODES = ("surf", "baseline", "preview")
OUTPUT_TYPES = ("np", "pil", "pt", "latent")
log = logging.getLogger("surf_train")


class StageClock:
    """Wall time of network calls, split by the latent size they run at, and of named stages (synchronises CUDA).

    `seconds`/`calls`: the report's stages; `spans`: time around parts that contain them or glue (sampler, upsample,
    mp4), for benchmarks, never summed into a report."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device, self.seconds, self.calls, self.spans = torch.device(device), {}, {}, {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn, name_of):
        def timed(x, *a):
            self._sync()
            t = time.perf_counter()
            out = fn(x, *a)
            self._sync()
            k = name_of(x)
            self.seconds[k] = self.seconds.get(k, 0.0) + time.perf_counter() - t
            self.calls[k] = self.calls.get(k, 0) + 1
            return out

        return timed

    def _timed(self, into: dict, name, fn, *a):
        self._sync()
        t = time.perf_counter()
        out = fn(*a)
        self._sync()
        into[name] = into.get(name, 0.0) + time.perf_counter() - t
        return out

    def time(self, name, fn, *a):
        return self._timed(self.seconds, name, fn, *a)

    def span(self, name, fn, *a):
        return self._timed(self.spans, name, fn, *a)


def _on_grid(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def default_prefix(target: tuple[int, int], native: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The target's aspect ratio at the base model's native pixel count, on the size grid (`multiple`)."""
    if target[0] * native[1] == target[1] * native[0]:
        return tuple(native)
    area, aspect = native[0] * native[1], target[1] / target[0]
    return _on_grid((area / aspect) ** 0.5, multiple), _on_grid((area * aspect) ** 0.5, multiple)


def plan_sizes(
    spec: BaseSpec,
    height=None,
    width=None,
    prefix=(None, None),
    preview=(None, None),
    mode: str = "surf",
    switch: int = 1,
) -> dict[str, tuple[int, int]]:
    """Pixel (h, w) of the target, prefix and preview; None: the base model's defaults (docs/method.md)."""
    h, w = height or spec.native_size[0], width or spec.native_size[1]
    g = spec.geometry
    m = g.stride_s * g.patch_s
    dp = default_prefix((h, w), spec.native_size, m)
    # default preview: half the target on the size grid (HunyuanVideo 720p: 352x640, as 360 is off the grid)
    sizes = {
        "target": (h, w),
        "prefix": (prefix[0] or dp[0], prefix[1] or dp[1]),
        "preview": (preview[0] or _on_grid(h / 2, m), preview[1] or _on_grid(w / 2, m)),
    }
    for name, (sh, sw) in sizes.items():
        g.check(None, sh, sw, name)
    if sizes["preview"][0] > h or sizes["preview"][1] > w:
        raise ConfigError(f"preview {sizes['preview']} is larger than target {(h, w)}")
    if (
        mode != "baseline"
        and switch
        and (sizes["prefix"][0] < sizes["preview"][0] or sizes["prefix"][1] < sizes["preview"][1])
    ):
        log.warning(
            "prefix %s is smaller than the preview %s: the switch resamples upward (set --prefix-height/"
            "--prefix-width)",
            sizes["prefix"],
            sizes["preview"],
        )
    return sizes


@dataclass
class SurfPlan:
    """What one call runs: sizes in pixels and latents, the schedule, the Refiner's steps, stage names."""

    mode: str
    sizes: dict[str, tuple[int, int]]  # pixels: target, prefix, preview
    frames: int
    lat: dict[str, tuple[int, int]]  # latent (h, w) of each size
    f_lat: int  # latent frames
    schedule: Schedule
    refiner_steps: int  # 0 unless mode == "surf"
    names: dict[tuple[int, int], str]  # latent (h, w) -> report stage of the base-model calls made there


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


ALIGN = 64  # bytes: PyTorch's CPU allocator's alignment


@torch.no_grad()
def realign(module: torch.nn.Module) -> None:
    """Copy parameters and buffers that do not start on an ALIGN-byte boundary into fresh memory.

    Tensors loaded from safetensors can sit at any 8-byte offset of the file's mapping, and CPU matmul kernels
    round differently on misaligned inputs (about 1e-6 on the tiny Wan), so a loaded pipeline would not reproduce
    the saved one bit for bit. Fresh copies sit where the allocator puts every tensor."""
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "cpu" and t.numel() and t.data_ptr() % ALIGN:
            t.data = t.data.clone()


class SurfPipeline(DiffusionPipeline):
    """SURF generation: base-model prefix, noise-reshifted preview, Refiner to the target size, VAE decode."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->transformer_2->refiner->vae"
    _optional_components = ["refiner", "text_encoder_2", "tokenizer_2", "transformer_2", "guider"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        transformer,
        vae,
        scheduler,
        refiner=None,
        text_encoder_2=None,
        tokenizer_2=None,
        base_spec: dict | str | BaseSpec | None = None,
        bridge: dict | None = None,
        transformer_2=None,
        base_options: dict | None = None,  # the family pipeline's own options, e.g. WanPipeline's expand_timesteps
        guider=None,
    ):
        super().__init__()
        if base_spec is None:
            raise ConfigError("SurfPipeline needs base_spec: a conf/base name, a BaseSpec or its dict")
        spec = (
            BaseSpec.from_name(base_spec)
            if isinstance(base_spec, str)
            else base_spec
            if isinstance(base_spec, BaseSpec)
            else BaseSpec.from_dict(base_spec)
        )
        names = {
            "tokenizer": tokenizer,
            "text_encoder": text_encoder,
            "transformer": transformer,
            "vae": vae,
            "scheduler": scheduler,
        }
        second = spec.family in ("hunyuan", "hunyuan15")  # a second text encoder; 1.5 also guides by a guider
        if second:
            names.update(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        if spec.family == "hunyuan15":
            names.update(guider=guider)
        experts = {}  # Wan 2.2 A14B: the low-noise expert and the boundary (conf/base's, checked by the adapter)
        if spec.boundary is not None:
            names["transformer_2"], experts = transformer_2, {"boundary_ratio": spec.boundary}
        # the family's own pipeline around the same modules: the adapter computes the velocity exactly as it does
        adapter = adapter_class(spec.family)
        options = {**(base_options or {}), **experts}
        self.base = adapter(spec, adapter.pipeline_class()(**names, **options), transformer.device)
        unused = {"text_encoder_2": None, "tokenizer_2": None, "transformer_2": None, "guider": None}
        self.register_modules(**{**unused, **names, "scheduler": self.base.pipe.scheduler}, refiner=refiner)
        self.register_to_config(base_spec=_spec_dict(spec), bridge=dict(bridge or {}), base_options=base_options or {})
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
                log.warning("%s", warning)
        return cls.from_base(load_base_model(spec, device), net, bridge)

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
        """Sizes, schedule and stage names of a call; ConfigError for settings the models cannot run."""
        if mode not in MODES:
            raise ConfigError(f"--mode {mode!r}: choose from {MODES}")
        if num_inference_steps < 1:
            raise ConfigError(f"--steps {num_inference_steps}: needs at least 1 base-model step")
        if refiner_steps is not None and refiner_steps < 1:
            raise ConfigError(f"--refiner-steps {refiner_steps}: needs at least 1 Refiner step")
        if not 0 <= switch <= num_inference_steps:
            raise ConfigError(f"--switch {switch} must be in [0, --steps {num_inference_steps}]")
        if mode == "surf" and self.refiner is None:
            raise ConfigError("mode 'surf' needs a Refiner (this pipeline has none: use 'preview' or 'baseline')")
        spec = self.spec
        frames = num_frames or spec.native_frames
        sizes = plan_sizes(spec, height, width, tuple(prefix_size), tuple(preview_size), mode, switch)
        spec.geometry.check(frames, *sizes["target"], "target")
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
        prompt: str | list[str],
        negative_prompt: str | None = None,
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
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
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
        generator: draws the start noise, the fresh noise of `paper`/`snr` and the Refiner's start-point noise,
        in that order, on the CPU; acceleration: the base model's cache and CFG truncation (None: off)."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type {output_type!r}: choose from {OUTPUT_TYPES}")
        if rule not in RULES or down not in DOWN_MODES:
            raise ConfigError(f"--rule must be one of {RULES} and --down one of {DOWN_MODES}")
        prefix, preview = (prefix_height, prefix_width), (preview_height, preview_width)
        steps = (num_inference_steps, switch)
        plan = self.plan(height, width, num_frames, *steps, prefix, preview, refiner_steps, mode, shift)
        model, acc = self.base, acceleration or Acceleration()
        self._prepare(acc)
        clock = clock or StageClock(model.device)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cond, text = self._encode(prompts, negative_prompt, mode, clock)
        model.meter.reset()
        vel = clock.wrap(
            model.velocity_fn(cond, guidance_scale, acc, guidance_scale_2), lambda x: plan.names[tuple(x.shape[-2:])]
        )
        noise = self._start_noise(plan, len(prompts), latents, generator)
        if mode == "baseline":
            latent = clock.span("sampler", sample, vel, noise, plan.schedule)  # the pipeline's own output
        else:
            latent = self._preview_and_refine(plan, vel, noise, text, (switch, rule, down), generator, clock)
        frames = latent if output_type == "latent" else self._decode(latent, output_type, clock)
        self.maybe_free_model_hooks()
        return SurfPipelineOutput(frames=frames, plan=plan) if return_dict else (frames,)

    def _prepare(self, acc: Acceleration) -> None:
        """The adapter follows the modules' device and dtype (after pipe.to(...)) and takes the acceleration."""
        model = self.base
        model.device, model.dtype = self.transformer.device, self.transformer.dtype
        try:
            model.accelerate(acc)
        except ConfigError as e:
            raise ConfigError(f"--cache-threshold/--cfg-stop/--no-cfg-low: {e}") from None

    def _decode(self, latent: torch.Tensor, output_type: str, clock: StageClock):
        video = clock.time("decode", self.base.vae_decode, latent)  # (B, 3, frames, H, W) in [-1, 1]
        return self.base.pipe.video_processor.postprocess_video(video, output_type=output_type)

    def _encode(self, prompts: list[str], negative_prompt, mode: str, clock: StageClock):
        """The base model's conditioning and the Refiner's text (B, L, D) (None without a text-conditioned one)."""
        model, net = self.base, self.refiner if mode == "surf" else None
        if negative_prompt is not None and not model.cfg_branch:
            raise ConfigError(f"negative_prompt: {model.spec.family} embeds its guidance (no negative branch)")
        args = () if negative_prompt is None else (negative_prompt,)
        cond = clock.time("text", model.encode_prompt, prompts, *args)
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
        return (torch.randn(shape, generator=generator) if latents is None else latents.float()).to(self.base.device)

    def _preview_and_refine(self, plan, vel, noise, text, reshift, generator, clock: StageClock) -> torch.Tensor:
        """The preview with noise reshifting (`reshift`: switch, rule, down), upsampled, then refined (mode "surf")
        -> target latent."""
        model, lat, (switch, rule, down) = self.base, plan.lat, reshift
        b, c = noise.shape[:2]
        pp = PreviewPlan(plan.schedule, switch=switch, preview_size=lat["preview"], rule=rule, down=down)
        fresh = torch.randn((b, c, plan.f_lat, *lat["preview"]), generator=generator).to(model.device)
        preview = clock.span("sampler", preview_sample, vel, noise, pp, fresh)
        sampler = self.sampler
        x_up = clock.span("upsample", sampler.upsample, preview, lat["target"])
        if plan.mode == "preview":
            return x_up
        net, dt = self.refiner, model.dtype

        def ref_fn(x, t, cnd, txt):
            txt = None if txt is None else txt.to(dt)
            return net(x.to(dt), t.to(dt), cnd.to(dt), txt, return_dict=False)[0].float()

        sampler = sampler.override(steps=plan.refiner_steps)
        return clock.time("refine", sampler.refine, ref_fn, x_up, preview, text, generator)


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
