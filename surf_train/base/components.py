"""A `BaseSpec` read off a pipeline's components, for pipelines built without a conf/base record
(`SurfPipeline(**components)`, as diffusers users and its tester mixins build pipelines).

The family comes from the transformer's class (or, without one, from the text encoders the family has); the
geometry from the transformer's and the VAE's configs as the family's pipeline reads them; the rest from what the
family's diffusers pipeline uses when a call does not say (its `__call__` defaults, its guider), and `fps` from its
documentation's examples. `FAMILY_DEFAULTS` holds them; a test checks them against the pipelines' signatures.
"""

from __future__ import annotations

from surf_train.base.spec import BaseSpec
from surf_train.common.dtypes import DTYPES
from surf_train.common.errors import ConfigError

TRANSFORMER_FAMILY = {
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuan",
    "HunyuanVideo15Transformer3DModel": "hunyuan15",
}
# what each family's pipeline does when a call does not say: (height, width), frames, fps, guidance, text length
FAMILY_DEFAULTS = {
    "wan": dict(native_size=(480, 832), native_frames=81, fps=16, guidance=5.0, max_sequence_length=512),
    "hunyuan": dict(native_size=(720, 1280), native_frames=129, fps=15, guidance=6.0, max_sequence_length=256),
    # size: the pipeline's 16:9 bucket of its transformer's target_size; guidance: its guider's
    "hunyuan15": dict(native_size=(720, 1280), native_frames=121, fps=24, guidance=6.0, max_sequence_length=1000),
}
# (channels, patch_t, patch_s) where a pipeline has no transformer to read them from (it can only encode prompts)
FAMILY_GEOMETRY = {"wan": (16, 1, 2), "hunyuan": (16, 1, 2), "hunyuan15": (32, 1, 1)}


def family_of(transformer, text_encoder_2=None, guider=None) -> str:
    """wan | hunyuan | hunyuan15 from the transformer's class; without one, from the family's other components."""
    if transformer is None:
        return "hunyuan15" if guider is not None else "hunyuan" if text_encoder_2 is not None else "wan"
    name = type(transformer).__name__
    if name not in TRANSFORMER_FAMILY:
        raise ConfigError(
            f"transformer {name}: no base family for it (known: {sorted(TRANSFORMER_FAMILY)}); pass base_spec"
        )
    return TRANSFORMER_FAMILY[name]


def _dtype_name(module, default: str = "float32") -> str:
    dtype = getattr(module, "dtype", None)
    return next((k for k, v in DTYPES.items() if v == dtype), default)


def _patch(config) -> tuple[int, int]:
    """(patch_t, patch_s): Wan's patch_size is (t, h, w); HunyuanVideo's are patch_size_t and patch_size."""
    p = config["patch_size"]
    return (p[0], p[1]) if isinstance(p, (list, tuple)) else (config.get("patch_size_t", 1), p)


def spec_from_pipe(family: str, pipe, base_options: dict | None = None) -> BaseSpec:
    """The BaseSpec of a family pipeline's components (see the module docstring)."""
    net, defaults = pipe.transformer, dict(FAMILY_DEFAULTS[family])
    channels, pt, ps = FAMILY_GEOMETRY[family]
    if net is not None:
        channels, (pt, ps) = net.config.out_channels, _patch(net.config)
    if family == "hunyuan15":
        if net is not None:
            h_w = pipe.video_processor.calculate_default_height_width(9, 16, pipe.target_size)
            defaults["native_size"] = tuple(int(x) for x in h_w)
        if getattr(pipe, "guider", None) is not None:
            defaults["guidance"] = float(pipe.guider.config.guidance_scale)
    boundary = (base_options or {}).get("boundary_ratio")
    vae = pipe.vae
    d = dict(
        name=f"{family} (from components)",
        family=family,
        pretrained=None,
        channels=int(channels),
        stride_t=int(pipe.vae_scale_factor_temporal),
        stride_s=int(pipe.vae_scale_factor_spatial),
        patch_t=int(pt),
        patch_s=int(ps),
        **defaults,
        boundary=boundary,
        dtype=_dtype_name(net if net is not None else pipe.text_encoder),
        vae_dtype=_dtype_name(vae),
        vae_class="pixel_shuffle" if type(vae).__name__ == "PixelShuffleVAE" else None,
    )
    if boundary is None and getattr(pipe, "transformer_2", None) is not None:
        raise ConfigError("transformer_2 needs base_options={'boundary_ratio': ...} (or base_spec)")
    return BaseSpec.from_dict(d)
