"""Analytic forward FLOPs of the base models and the Refiner, per stage of a baseline and a SURF run.

Convention: one multiply-add = 2 FLOPs, forward pass only. Counted: every matrix product of one
transformer call (linear layers and the patch-embedding Conv3d at their true shapes, attention scores
Q K^T and the weighted sum A V as 2 x 2 x queries x keys x head_dim x heads), biases excluded. That is
exactly what `torch.utils.flop_counter.FlopCounterMode` counts (mm/addmm/bmm/convolution/SDPA), and
tests/test_flops.py checks the two for equality on the tiny models and, on the meta device, on the
released Wan 2.1 14B and HunyuanVideo architectures at 720p.

Not counted: elementwise work (norms, softmax, RoPE, activations, adaLN modulation and gates, residual
adds). Its largest part is the softmax, about 5 operations per attention score against 4 x head_dim
= 512 matmul FLOPs per score: +0.7% for Wan 2.1 14B at 720p, the rest is < 0.1%. Also not counted: the
text encoders (once per prompt: umT5-XXL on 2 x 512 tokens is about 0.01 PFLOPs) and, unless `--vae`,
the VAE decode (once per video, the same in both runs: 0.64 PFLOPs for Wan at 1280x720x81, 3.0 for
HunyuanVideo at 1280x720x129, untiled).

`python -m surf_train.flops` prints the default table; `--help` lists the options.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from surf_train.base.sampling import RULES
from surf_train.common.cli_args import add_fields, from_args
from surf_train.common.errors import ConfigError
from surf_train.models.refiner import RefinerConfig
from surf_train.models.windows import IMPLS, Size3, _runs, clamp_window, shift_size

PFLOP = 1e15

# --- architecture constants --------------------------------------------------------------------
# Transformer configs of the released checkpoints (transformer/config.json on the public model cards;
# nothing is downloaded here), with the keys diffusers' WanTransformer3DModel and
# HunyuanVideoTransformer3DModel take. diffusers' own constructor defaults are the Wan 2.1 14B and
# HunyuanVideo values (checked in tests/test_flops.py), so WAN_DEFAULTS / HUNYUAN_DEFAULTS fill in
# keys a partial config leaves out.
WAN_DEFAULTS: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    image_dim=None,
    added_kv_proj_dim=None,
)
HUNYUAN_DEFAULTS: dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    image_condition_type=None,
)
ARCH: dict[str, dict[str, Any]] = {
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers: dim 1536 = 12 x 128, ffn 8960, 30 layers.
    "wan2.1_t2v_1.3b": {**WAN_DEFAULTS, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    # Wan-AI/Wan2.1-T2V-14B-Diffusers: dim 5120 = 40 x 128, ffn 13824, 40 layers.
    "wan2.1_t2v_14b": dict(WAN_DEFAULTS),
    # hunyuanvideo-community/HunyuanVideo: 20 double + 40 single blocks, 24 x 128, Llama 4096, CLIP 768.
    "hunyuan_video": dict(HUNYUAN_DEFAULTS),
}
# Text tokens each transformer call sees: the pipelines pad the prompt to these lengths and attention
# runs over the padded length (masked for HunyuanVideo), so the padded length is what is computed.
TEXT_LEN = {"wan": 512, "hunyuan": 256}
CFG_FAMILIES = {"wan"}  # HunyuanVideo embeds the guidance scale: one call per step, no CFG batch.

# Paper numbers (SURF, arXiv 2603.21002, Table 1 and abstract; Wan 2.1 14B, 720p, 81 frames).
PAPER = {
    "wan2.1_t2v_14b": {
        "baseline_pflops": 658.46,
        "surf_pflops": 34.3,
        "baseline_s": 3497,
        "surf_s": 278,
        "speedup_time": 12.58,
    },
    "hunyuan_video": {"speedup_time": 8.7},
}


# --- helpers -----------------------------------------------------------------------------------


def _grid(latent: Sequence[int], patch: Size3) -> Size3:
    """Token grid of a (C, F, H, W) latent; raises ConfigError when the patch does not divide it."""
    if len(latent) != 4 or min(latent) < 1:
        raise ConfigError(f"latent shape must be 4 positive ints (C, F, H, W), got {tuple(latent)}")
    fhw = tuple(int(s) for s in latent[1:])
    if any(s % p for s, p in zip(fhw, patch)):
        raise ConfigError(f"latent (F, H, W) = {fhw} is not divisible by patch {tuple(patch)}")
    return tuple(s // p for s, p in zip(fhw, patch))  # type: ignore[return-value]


def _lin(rows: int, d_in: int, d_out: int) -> int:
    """FLOPs of a linear layer (bias excluded) applied to `rows` vectors."""
    return 2 * rows * d_in * d_out


def _sdpa(queries: int, keys: int, width: int) -> int:
    """FLOPs of scores Q K^T plus weighted sum A V over all heads (heads * head_dim = width)."""
    return 4 * queries * keys * width


def _time_mlp(rows: int, freq_dim: int, dim: int) -> int:
    """diffusers TimestepEmbedding: linear freq_dim -> dim, SiLU, linear dim -> dim."""
    return _lin(rows, freq_dim, dim) + _lin(rows, dim, dim)


def total(parts: Mapping[str, int]) -> int:
    return sum(parts.values())


# --- one transformer call ------------------------------------------------------------------------


def wan_flops(config: Mapping[str, Any], latent: Sequence[int], text_len: int = 512, batch: int = 1) -> dict[str, int]:
    """FLOPs of one WanTransformer3DModel forward (text-to-video) on a (C, F, H, W) latent, per component.

    Components: patch_embed (Conv3d), time_embed (time MLP + the shared 6*D adaLN projection, one row
    per sample), text_embed (the 2-layer text projection of all `text_len` tokens, recomputed every
    call as diffusers does), self_attn_proj (q, k, v, out), self_attn_sdpa (N x N scores + sum),
    cross_attn_proj (q and out on video tokens, k and v on text tokens), cross_attn_sdpa (N x L),
    ffn (two linears), proj_out. Config keys are diffusers' (missing ones take WAN_DEFAULTS).
    """
    c = {**WAN_DEFAULTS, **dict(config)}
    if c.get("image_dim") is not None or c.get("added_kv_proj_dim") is not None:
        raise ConfigError("image-to-video Wan (image_dim / added_kv_proj_dim) is not modelled; text-to-video only")
    patch = tuple(c["patch_size"])
    grid = _grid(latent, patch)  # type: ignore[arg-type]
    n, l, b = math.prod(grid), int(text_len), int(batch)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    pvol = math.prod(patch)
    c_in, c_out = latent[0], (c.get("out_channels") or c["in_channels"])
    if c_in != c["in_channels"]:
        raise ConfigError(f"latent has {c_in} channels, the Wan config {c['in_channels']}")
    layers = c["num_layers"]
    parts = {
        "patch_embed": _lin(n, c_in * pvol, d),
        "time_embed": _time_mlp(1, c["freq_dim"], d) + _lin(1, d, 6 * d),
        "text_embed": _lin(l, c["text_dim"], d) + _lin(l, d, d),
        "self_attn_proj": layers * 4 * _lin(n, d, d),
        "self_attn_sdpa": layers * _sdpa(n, n, d),
        "cross_attn_proj": layers * (2 * _lin(n, d, d) + 2 * _lin(l, d, d)),
        "cross_attn_sdpa": layers * _sdpa(n, l, d),
        "ffn": layers * (_lin(n, d, c["ffn_dim"]) + _lin(n, c["ffn_dim"], d)),
        "proj_out": _lin(n, d, c_out * pvol),
    }
    return {k: b * v for k, v in parts.items()}


def hunyuan_flops(
    config: Mapping[str, Any], latent: Sequence[int], text_len: int = 256, batch: int = 1
) -> dict[str, int]:
    """FLOPs of one HunyuanVideoTransformer3DModel forward (text-to-video) on a (C, F, H, W) latent.

    Components: patch_embed; time_embed (timestep MLP, guidance MLP when guidance_embeds, pooled CLIP
    projection); token_refiner (its own time/pooled-text embedding, proj_in, num_refiner_layers blocks
    of self-attention over the L text tokens, SiLU MLP x4 and gate projection); adaln (the per-block
    modulation linears: 6D x 2 per double block, 3D per single block, 2D final); double_proj
    (q, k, v, out for video and text streams), double_sdpa (joint attention over N + L tokens),
    double_ffn (video and text MLPs); single_proj (q, k, v, MLP-in and fused out projection over
    N + L tokens), single_sdpa; proj_out. Attention runs over the padded text length (masked).
    """
    c = {**HUNYUAN_DEFAULTS, **dict(config)}
    if c.get("image_condition_type") is not None:
        raise ConfigError("image-conditioned HunyuanVideo is not modelled; text-to-video only")
    p, pt = int(c["patch_size"]), int(c["patch_size_t"])
    patch = (pt, p, p)
    grid = _grid(latent, patch)
    n, l, b = math.prod(grid), int(text_len), int(batch)
    s = n + l
    d = c["num_attention_heads"] * c["attention_head_dim"]
    m = int(d * c["mlp_ratio"])  # FeedForward(mult=mlp_ratio) and the single block's mlp_dim
    c_in, c_out = latent[0], (c.get("out_channels") or c["in_channels"])
    if c_in != c["in_channels"]:
        raise ConfigError(f"latent has {c_in} channels, the HunyuanVideo config {c['in_channels']}")
    dt, nd, ns, nr = c["text_embed_dim"], c["num_layers"], c["num_single_layers"], c["num_refiner_layers"]
    m_ref = int(d * 4.0)  # the token refiner's MLP ratio is fixed at 4 in diffusers
    refiner_block = 4 * _lin(l, d, d) + _sdpa(l, l, d) + _lin(l, d, m_ref) + _lin(l, m_ref, d) + _lin(1, d, 2 * d)
    parts = {
        "patch_embed": _lin(n, c_in * math.prod(patch), d),
        "time_embed": _time_mlp(1, 256, d) * (2 if c["guidance_embeds"] else 1)
        + _lin(1, c["pooled_projection_dim"], d)
        + _lin(1, d, d),
        "token_refiner": _time_mlp(1, 256, d) + _lin(1, dt, d) + _lin(1, d, d) + _lin(l, dt, d) + nr * refiner_block,
        "adaln": nd * 2 * _lin(1, d, 6 * d) + ns * _lin(1, d, 3 * d) + _lin(1, d, 2 * d),
        "double_proj": nd * (4 * _lin(n, d, d) + 4 * _lin(l, d, d)),
        "double_sdpa": nd * _sdpa(s, s, d),
        "double_ffn": nd * (_lin(n, d, m) + _lin(n, m, d) + _lin(l, d, m) + _lin(l, m, d)),
        "single_proj": ns * (3 * _lin(s, d, d) + _lin(s, d, m) + _lin(s, d + m, d)),
        "single_sdpa": ns * _sdpa(s, s, d),
        "proj_out": _lin(n, d, c_out * math.prod(patch)),
    }
    return {k: b * v for k, v in parts.items()}


def block_flops(family: str, config: Mapping[str, Any], latent: Sequence[int], text_len: int) -> dict[str, int]:
    """FLOPs of one transformer block of each block list, per forward: the work a block cache skips.

    Keys are the transformer's block lists (Wan `blocks`; HunyuanVideo `transformer_blocks` (double) and
    `single_transformer_blocks`); a forward costs its total minus the blocks it did not run.
    """
    if family == "wan":
        c, p = {**WAN_DEFAULTS, **dict(config)}, wan_flops(config, latent, text_len)
        inner = ("self_attn_proj", "self_attn_sdpa", "cross_attn_proj", "cross_attn_sdpa", "ffn")
        return {"blocks": sum(p[k] for k in inner) // c["num_layers"]}
    c, p = {**HUNYUAN_DEFAULTS, **dict(config)}, hunyuan_flops(config, latent, text_len)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    nd, ns = c["num_layers"], c["num_single_layers"]
    # each block holds its own adaLN linears (two 6D in a double block, one 3D in a single block)
    return {
        "transformer_blocks": (p["double_proj"] + p["double_sdpa"] + p["double_ffn"]) // nd + 2 * _lin(1, d, 6 * d),
        "single_transformer_blocks": (p["single_proj"] + p["single_sdpa"]) // ns + _lin(1, d, 3 * d),
    }


def metered_flops(
    family: str,
    config: Mapping[str, Any],
    latents: Mapping[tuple[int, int], Sequence[int]],
    forwards: Mapping[tuple[int, int], int],
    blocks: Mapping[tuple[tuple[int, int], str], int],
    text_len: int,
) -> dict[tuple[int, int], int]:
    """FLOPs of the transformer work actually done, by latent (h, w): full forwards minus the blocks not run.

    latents: (h, w) -> (C, F, H, W); forwards / blocks: a base model's Meter (sample forwards, blocks run per
    list), so the result covers every sample of every batch.
    """
    fn = wan_flops if family == "wan" else hunyuan_flops
    c = {**(WAN_DEFAULTS if family == "wan" else HUNYUAN_DEFAULTS), **dict(config)}
    n_of = {
        "blocks": c["num_layers"],
        "transformer_blocks": c["num_layers"],
        "single_transformer_blocks": c.get("num_single_layers", 0),
    }
    out = {}
    for hw, n in forwards.items():
        per_call, per_block = (
            total(fn(config, latents[hw], text_len)),
            block_flops(family, config, latents[hw], text_len),
        )
        skipped = sum((n * n_of[k] - blocks.get((hw, k), 0)) * f for k, f in per_block.items())
        out[hw] = n * per_call - skipped
    return out


def window_pairs(grid: Size3, window: Size3, shift: bool = False, impl: str = "grouped") -> int:
    """Query-key pairs (per sample and head) that one window-attention call computes.

    "mask": the padded, rolled grid cut into whole windows, each Lw x Lw including padding slots
    (prod over axes of ceil(g / w) * w^2). "grouped"/"auto": the exact partition (cuts at s, s + w, ...,
    partial border windows), sum of size^2 over windows = prod over axes of sum of piece lengths^2.
    A window covering the whole grid gives N^2 either way.
    """
    if impl not in IMPLS:
        raise ConfigError(f"unknown window attention impl {impl!r}; choose from {IMPLS}")
    win = clamp_window(grid, window)
    if impl == "mask":
        return math.prod(math.ceil(g / w) * w * w for g, w in zip(grid, win))
    shifts = shift_size(grid, win) if shift else (0, 0, 0)
    out = 1
    for g, w, s in zip(grid, win, shifts):
        out *= sum((z - a) // size * size * size for a, z, size in _runs(g, w, s))
    return out


def refiner_flops(
    cfg: RefinerConfig, latent: Sequence[int], text_len: int = 0, batch: int = 1, impl: str | None = None
) -> dict[str, int]:
    """FLOPs of one Refiner forward on a (C, F, H, W) target latent (x_t and cond concatenated inside).

    Components as wan_flops, with self_attn_sdpa the windowed cost: blocks alternate plain (even)
    and shifted (odd) windows, each 4 * pairs * dim (see window_pairs; `impl` defaults to
    cfg.attn_impl, "auto" meaning "grouped"); ffn_conv is the FFN's depthwise conv (0 without).
    text_len = 0 (or cfg.text_dim = 0) drops the text projection and cross-attention.
    """
    patch = tuple(cfg.patch_size)
    grid = _grid(latent, patch)  # type: ignore[arg-type]
    if latent[0] != cfg.in_channels:
        raise ConfigError(f"latent has {latent[0]} channels, the Refiner {cfg.in_channels}")
    impl = impl or cfg.attn_impl
    n, b, d, depth = math.prod(grid), int(batch), cfg.dim, cfg.depth
    l = int(text_len) if cfg.text_dim else 0
    pvol = math.prod(patch)
    pairs = sum(window_pairs(grid, cfg.window, i % 2 == 1, impl) for i in range(depth))
    parts = {
        "patch_embed": _lin(n, 2 * cfg.in_channels * pvol, d),
        "time_embed": _time_mlp(1, cfg.freq_dim, d) + _lin(1, d, 6 * d),
        "text_embed": _lin(l, cfg.text_dim, d) + _lin(l, d, d) if l else 0,
        "self_attn_proj": depth * 4 * _lin(n, d, d),
        "self_attn_sdpa": 4 * pairs * d,
        "cross_attn_proj": depth * (2 * _lin(n, d, d) + 2 * _lin(l, d, d)) if l else 0,
        "cross_attn_sdpa": depth * _sdpa(n, l, d) if l else 0,
        "ffn": depth * (_lin(n, d, cfg.ffn_dim) + _lin(n, cfg.ffn_dim, d)),
        "ffn_conv": depth * 2 * n * cfg.ffn_dim * cfg.ffn_conv**2,  # depthwise k x k on the hidden features
        "proj_out": _lin(n, d, cfg.in_channels * pvol),
    }
    return {k: b * v for k, v in parts.items()}


def transformer_flops(transformer: Any, latent: Sequence[int], text_len: int, batch: int = 1) -> dict[str, int]:
    """One call of a loaded diffusers Wan or HunyuanVideo transformer (from its .config), per component."""
    kind = type(transformer).__name__
    if kind.startswith("Wan"):
        return wan_flops(dict(transformer.config), latent, text_len, batch)
    if kind.startswith("HunyuanVideo"):
        return hunyuan_flops(dict(transformer.config), latent, text_len, batch)
    raise ConfigError(f"no FLOPs model for {kind}; Wan and HunyuanVideo transformers only")


# --- base models by name -------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseArch:
    """What the cost model needs of a base model: family, transformer config and VAE geometry."""

    name: str
    family: str
    config: dict[str, Any]
    channels: int
    stride_t: int
    stride_s: int
    patch_t: int
    patch_s: int

    @classmethod
    def from_name(cls, name: str) -> BaseArch:
        """Geometry from conf/base/<name>.yaml, transformer config from ARCH."""
        from surf_train.base.adapter import BaseSpec

        if name not in ARCH:
            raise ConfigError(f"no architecture constants for base model {name!r}; known: {sorted(ARCH)}")
        spec = BaseSpec.from_name(name)
        return cls(
            name, spec.family, ARCH[name], spec.channels, spec.stride_t, spec.stride_s, spec.patch_t, spec.patch_s
        )

    @property
    def text_len(self) -> int:
        return TEXT_LEN[self.family]

    @property
    def cfg_factor(self) -> int:
        return 2 if self.family in CFG_FAMILIES else 1

    def latent(self, frames: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(C, F, H, W) latent of a video of `frames` frames and size (width, height) in pixels."""
        from surf_train.base.adapter import LatentGeometry

        w, h = size
        geo = LatentGeometry(self.channels, self.stride_t, self.stride_s, self.patch_t, self.patch_s)
        return geo.latent_shape(frames, h, w)

    def flops(self, latent: Sequence[int], text_len: int | None = None) -> dict[str, int]:
        """One transformer call (one CFG branch)."""
        fn = wan_flops if self.family == "wan" else hunyuan_flops
        return fn(self.config, latent, self.text_len if text_len is None else text_len)


def vae_decode_flops(name: str, latent: Sequence[int]) -> int:
    """Matmul/conv FLOPs of one VAE decode, counted by FlopCounterMode on the meta device.

    Builds diffusers' AutoencoderKLWan / AutoencoderKLHunyuanVideo with their default configs (those of
    the released VAEs) on the meta device, so nothing is allocated; untiled decode. Takes a few seconds.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    family = BaseArch.from_name(name).family
    if family == "wan":
        from diffusers import AutoencoderKLWan as Vae
    else:
        from diffusers import AutoencoderKLHunyuanVideo as Vae
    with torch.device("meta"):
        vae = Vae()
    z = torch.empty(1, *latent, device="meta")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vae.decode(z, return_dict=False)
    return int(counter.get_total_flops())


# --- runs ----------------------------------------------------------------------------------------


def parse_size(text: str | Sequence[int]) -> tuple[int, int]:
    """'1280x720' (width x height) -> (1280, 720)."""
    if not isinstance(text, str):
        w, h = text
        return int(w), int(h)
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {text!r} must be WIDTHxHEIGHT, e.g. 1280x720") from None
    return w, h


def _fmt_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass
class Stage:
    """One stage of a run: `calls` network evaluations of `flops_per_call` each (CFG included)."""

    run: str  # baseline | surf
    stage: str  # base | prefix | preview | refine | vae_decode
    network: str
    size: str  # WxH pixels
    latent: list[int]  # (C, F, H, W)
    tokens: int
    calls: int  # network evaluations (steps x CFG branches)
    flops_per_call: int
    parts: dict[str, int] = field(default_factory=dict)  # per-call components

    @property
    def flops(self) -> int:
        return self.calls * self.flops_per_call

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tflops_per_call"] = self.flops_per_call / 1e12
        d["pflops"] = self.flops / PFLOP
        return d


@dataclass
class RunSettings:
    """A baseline run and a SURF run of one base model (sizes are (width, height) in pixels)."""

    model: str = "wan2.1_t2v_14b"
    target: tuple[int, int] = (1280, 720)
    frames: int = 81
    steps: int = 50  # baseline steps
    surf_steps: int | None = 40  # SURF base-model steps, prefix + preview (the paper's 10 + 30); None: steps
    switch: int = 10  # steps at the prefix size before the switch
    prefix: tuple[int, int] | None = None  # None: 480p of the family (PREFIX)
    preview: tuple[int, int] = (416, 240)
    refiner: str = "paper"  # RefinerConfig preset (conf/model)
    window: Size3 | None = None  # None: the preset's
    refiner_steps: int = 10  # Refiner steps
    refiner_text: bool = True  # the Refiner cross-attends to the base model's text tokens
    attn_impl: str = "grouped"
    rule: str = "pool"  # re-noise rule; paper and snr cost one more prefix call (the velocity at the switch)
    cfg: bool | None = None  # CFG batch; None (auto): the family's (Wan on, HunyuanVideo off)
    cfg_low: bool = True  # CFG in SURF's preview steps (off: CFG truncation)
    cfg_stop: int | None = None  # no CFG from this step of each run's schedule on (CFG truncation); None: never
    cache_hits: float = 0.0  # fraction of base-model forwards where FirstBlockCache skips all blocks but the first
    vae: bool = False  # add the VAE decode of the target to both runs (counted on the meta device, seconds)
    label: str = ""


# Native 480p of each family, width a multiple of 16 (VAE 8 x patch 2): Wan 832x480, HunyuanVideo 848x480.
PREFIX = {"wan": (832, 480), "hunyuan": (848, 480)}


def run_costs(s: RunSettings) -> dict[str, Any]:
    """Per-stage and total FLOPs of the baseline and the SURF run described by `s` (JSON-ready)."""
    arch = BaseArch.from_name(s.model)
    surf_steps = s.steps if s.surf_steps is None else s.surf_steps
    if s.steps < 1 or surf_steps < 1 or s.refiner_steps < 0:
        raise ConfigError(f"steps must be >= 1 (got {s.steps}, surf {surf_steps}), refiner steps >= 0")
    if not 0 <= s.switch <= surf_steps:
        raise ConfigError(f"switch must be in [0, {surf_steps}], got {s.switch}")
    if s.rule not in RULES:
        raise ConfigError(f"unknown re-noise rule {s.rule!r}; choose from {RULES}")
    if not 0 <= s.cache_hits <= 1:
        raise ConfigError(f"cache_hits={s.cache_hits} must be a fraction in [0, 1]")
    if s.cfg_stop is not None and s.cfg_stop < 0:
        raise ConfigError(f"cfg_stop={s.cfg_stop} must be >= 0")
    stop = math.inf if s.cfg_stop is None else s.cfg_stop
    prefix = s.prefix or PREFIX[arch.family]
    cfg_x = (2 if s.cfg else 1) if s.cfg is not None else arch.cfg_factor
    target_lat = arch.latent(s.frames, s.target)
    prefix_lat = arch.latent(s.frames, prefix)
    preview_lat = arch.latent(s.frames, s.preview)
    patch = (arch.patch_t, arch.patch_s, arch.patch_s)

    def base_stage(run: str, stage: str, size, lat, steps: int, cfg_steps: int) -> Stage:
        """`steps` velocities at `lat`, `cfg_steps` of them with both CFG branches."""
        parts = arch.flops(lat)
        if s.cache_hits:  # a cache hit runs the first block only (DESIGN: first-block cache); mean over calls
            per_block = block_flops(arch.family, arch.config, lat, arch.text_len)
            first = next(iter(per_block))
            n = {
                "blocks": arch.config["num_layers"],
                "transformer_blocks": arch.config["num_layers"],
                "single_transformer_blocks": arch.config.get("num_single_layers", 0),
            }
            skipped = sum((n[k] - (k == first)) * f for k, f in per_block.items())
            parts = {**parts, "cache_skipped": -round(s.cache_hits * skipped)}
        return Stage(
            run,
            stage,
            s.model,
            _fmt_size(size),
            list(lat),
            math.prod(_grid(lat, patch)),
            steps + cfg_steps * (cfg_x - 1),
            total(parts),
            parts,
        )

    rcfg = RefinerConfig.preset(s.refiner, **({"window": tuple(s.window)} if s.window else {}))
    rparts = refiner_flops(rcfg, target_lat, arch.text_len if s.refiner_text else 0, impl=s.attn_impl)
    # paper/snr evaluate v once more at the switch (sampling._switch), unless the prefix already reached s = 0.
    extra = int(s.rule != "pool" and s.switch < surf_steps)
    # CFG steps: the prefix runs steps 0..switch-1 (and the extra call at the switch), the preview switch..end
    baseline = [base_stage("baseline", "base", s.target, target_lat, s.steps, min(s.steps, stop))]
    surf = [
        base_stage("surf", "prefix", prefix, prefix_lat, s.switch + extra, min(s.switch + extra, stop)),
        base_stage(
            "surf",
            "preview",
            s.preview,
            preview_lat,
            surf_steps - s.switch,
            max(0, min(surf_steps, stop) - s.switch) if s.cfg_low else 0,
        ),
        Stage(
            "surf",
            "refine",
            f"refiner:{s.refiner} window={list(rcfg.window)}",
            _fmt_size(s.target),
            list(target_lat),
            math.prod(_grid(target_lat, rcfg.patch_size)),
            s.refiner_steps,
            total(rparts),
            rparts,
        ),
    ]
    if s.vae:
        vae = vae_decode_flops(s.model, target_lat)
        for run in (baseline, surf):
            run.append(
                Stage(run[0].run, "vae_decode", f"vae:{arch.family}", _fmt_size(s.target), list(target_lat), 0, 1, vae)
            )
    b_total, s_total = sum(x.flops for x in baseline), sum(x.flops for x in surf)
    return {
        "label": s.label or f"{s.model} {_fmt_size(s.target)}",
        "model": s.model,
        "settings": {
            **asdict(s),
            "prefix": list(prefix),
            "surf_steps": surf_steps,
            "cfg_factor": cfg_x,
            "refiner_config": rcfg.to_dict(),
            "text_len": arch.text_len,
        },
        "baseline_pflops": b_total / PFLOP,
        "surf_pflops": s_total / PFLOP,
        "speedup": b_total / s_total,
        "stages": [x.to_dict() for x in baseline + surf],
    }


def default_settings() -> list[RunSettings]:
    """The default table: Wan 2.1 14B (81 frames, CFG) and HunyuanVideo (129 frames) at 1280x720.

    SURF always uses the paper's split for 40 steps (10 at 480p, 30 at 240p) and 10 Refiner steps;
    baselines at 50 steps (the paper's Table 1 baseline, 658.46 PFLOPs) and at 40 steps (same steps).
    """
    out = []
    for model, frames in (("wan2.1_t2v_14b", 81), ("hunyuan_video", 129)):
        for steps in (50, 40):
            out.append(
                RunSettings(
                    model=model,
                    frames=frames,
                    steps=steps,
                    surf_steps=40,
                    switch=10,
                    label=f"{model} 1280x720x{frames}, baseline {steps} steps vs SURF 10+30",
                )
            )
    return out


def paper_comparison(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Our numbers next to the paper's for the runs whose model the paper reports."""
    out = {}
    for r in runs:
        p = PAPER.get(r["model"])
        if not p or r["settings"]["steps"] != 50:
            continue
        row = {
            "ours_baseline_pflops": r["baseline_pflops"],
            "ours_surf_pflops": r["surf_pflops"],
            "ours_speedup_flops": r["speedup"],
            **{f"paper_{k}": v for k, v in p.items()},
        }
        if "baseline_pflops" in p:
            row["baseline_ratio_paper_over_ours"] = p["baseline_pflops"] / r["baseline_pflops"]
            row["surf_ratio_paper_over_ours"] = p["surf_pflops"] / r["surf_pflops"]
        out[r["model"]] = row
    return out


# --- SURF composed with acceleration plug-ins ------------------------------------------------------

MEASURED = "benchmarks/results/accel/accel.json"  # python -m surf_train.evaluate_accel on the toy base
TOY_BLOCKS = 4  # transformer blocks of the toy base (assets/toy_base/transformer/config.json)


def measured_accel(path: str | None = None) -> dict[str, Any]:
    """What the toy run measured: FirstBlockCache hit rates per method, and its step settings.

    The toy evaluation reports blocks run / blocks of full forwards, f; a hit runs 1 of the toy's 4 blocks,
    a miss all 4, so hits = (1 - f) / (1 - 1/4). Empty when the file is absent.
    """
    from surf_train import CONF_DIR

    p = Path(path) if path else CONF_DIR.parent / MEASURED
    if not p.is_file():
        return {}
    res = json.loads(p.read_text())
    hits = {k: round((1 - r["blocks_run"]) / (1 - 1 / TOY_BLOCKS), 4) for k, r in res["methods"].items()}
    c = res["config"]
    few = [r["settings"]["switch"] for k, r in res["methods"].items() if k.startswith("surf@")]
    return {
        "hits": hits,
        "steps": c["steps"],
        "switch": c["switch"],
        "cfg_stop": c.get("cfg_stop"),
        "fewer_steps": c["fewer_steps"],
        "n": res["n"],
        **({"few_switch": few[-1]} if few else {}),
    }


def composed_speedups(
    measured: Mapping[str, Any], targets=((1280, 720), (1920, 1072)), model: str = "wan2.1_t2v_14b"
) -> list[dict[str, Any]]:
    """Baseline and SURF (10 + 30 steps, 10 Refiner steps) with and without the plug-ins, per target size.

    The toy's settings are carried over as fractions of the schedule: its cache hit rates per method (0 where
    not measured), its CFG stop step and its fewer steps (both scaled from the toy's steps to SURF's 40).
    Each row: PFLOPs, the speedup against the plain 50-step baseline at that size and against plain SURF.
    """
    hits = measured.get("hits", {})
    toy_steps = measured.get("steps", 20)
    scale = lambda k: round(k * 40 / toy_steps)
    stop = scale(measured.get("cfg_stop") or 8)
    few = scale(measured.get("fewer_steps", 10))
    few_switch = max(
        1,
        int(10 * few / 40 + 0.5)
        if "few_switch" not in measured
        else int(measured["few_switch"] * few / measured["fewer_steps"] + 0.5),
    )  # the toy's share
    out = []
    for target in targets:
        base = RunSettings(model=model, target=target, steps=50, surf_steps=40, switch=10)
        h = lambda k: hits.get(k, 0.0)
        variants = [
            ("baseline", "baseline", base),
            ("baseline+cache", "baseline", replace(base, cache_hits=h("baseline+cache"))),
            ("surf", "surf", base),
            ("surf+cache", "surf", replace(base, cache_hits=h("surf+cache"))),
            ("surf+cfg-low", "surf", replace(base, cfg_low=False)),
            ("surf+cache+cfg-low", "surf", replace(base, cfg_low=False, cache_hits=h("surf+cache+cfg-low"))),
            (f"surf+cfg-stop ({stop})", "surf", replace(base, cfg_stop=stop)),
            (
                f"surf+cache+cfg-stop ({stop})",
                "surf",
                replace(base, cfg_stop=stop, cache_hits=h("surf+cache+cfg-stop")),
            ),
            (
                f"surf@{few} ({few_switch} + {few - few_switch} steps)",
                "surf",
                replace(base, surf_steps=few, switch=few_switch),
            ),
        ]
        costs = {name: run_costs(st)[f"{run}_pflops"] for name, run, st in variants}
        for name, _, st in variants:
            out.append(
                {
                    "target": _fmt_size(target),
                    "method": name,
                    "cache_hits": st.cache_hits,
                    "pflops": costs[name],
                    "speedup": costs["baseline"] / costs[name],
                    "vs_surf": costs["surf"] / costs[name],
                }
            )
    return out


def format_composed(rows: list[dict[str, Any]], measured: Mapping[str, Any]) -> str:
    if measured:
        src = (
            f"Cache hit rates measured on the toy base (N={measured['n']}, {MEASURED}; its CFG stop step "
            f"{measured['cfg_stop']} and fewer steps {measured['fewer_steps']} of {measured['steps']} scaled to "
            "SURF's 40)."
        )
    else:
        src = f"No toy measurement ({MEASURED} absent): cache hit rates 0."
    lines = [
        "## Wan 2.1 14B, 81 frames: SURF composed with acceleration plug-ins (FLOPs)",
        "",
        src,
        "What transfers: CFG truncation and fewer steps are counted exactly (calls skipped do not depend on the "
        "model). What does not: the cache hit rates belong to the toy's 4-block network, its threshold and "
        "its noise levels; a real model's hits, and whether quality survives them, must be measured there (on the "
        "toy every plug-in costs caption match: benchmarks/results/accel/accel.md). "
        "A hit is counted as running only the first block. 1080p is 1920x1072 (WanPipeline floors the "
        "height to a multiple of 16).",
        "",
        "| target | method | cache hits | PFLOPs | vs baseline (50 steps) | vs SURF |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['method']} | {r['cache_hits']:.2f} | {r['pflops']:.2f} | "
            f"{r['speedup']:.1f}x | {r['vs_surf']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


# --- command line --------------------------------------------------------------------------------


def format_table(runs: list[dict[str, Any]]) -> str:
    lines = []
    for r in runs:
        st = r["settings"]
        lines.append(f"## {r['label']}")
        lines.append(
            f"CFG x{st['cfg_factor']}, text {st['text_len']} tokens, refiner {st['refiner']} "
            f"window {st['refiner_config']['window']} ({st['attn_impl']}), rule {st['rule']}"
        )
        lines.append("")
        lines.append("| run | stage | size | latent (C,F,H,W) | tokens | calls | TFLOPs/call | PFLOPs |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for x in r["stages"]:
            lines.append(
                f"| {x['run']} | {x['stage']} | {x['size']} | {tuple(x['latent'])} | {x['tokens']} | "
                f"{x['calls']} | {x['tflops_per_call']:.2f} | {x['pflops']:.2f} |"
            )
        lines.append(f"| **baseline** | | | | | | | **{r['baseline_pflops']:.2f}** |")
        lines.append(f"| **SURF** | | | | | | | **{r['surf_pflops']:.2f}** |")
        lines.append("")
        lines.append(f"FLOPs speedup: {r['speedup']:.2f}x")
        lines.append("")
    return "\n".join(lines)


def _window(text: str) -> Size3:
    try:
        w = tuple(int(v) for v in text.split(","))
    except ValueError:
        w = ()
    if len(w) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} must be 3 comma-separated ints wt,wh,ww, e.g. 4,16,16")
    return w  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m surf_train.flops",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Analytic forward FLOPs (1 multiply-add = 2 FLOPs; matmuls, convolutions and attention "
        "only) of a baseline run (base model at the target size for all steps, x2 for CFG) and a "
        "SURF run (prefix steps at 480p, preview steps at 240p, Refiner steps at the target size). "
        "With no --model, prints the default table (Wan 2.1 14B and HunyuanVideo at 1280x720, "
        "baselines of 50 and 40 steps, SURF 10 + 30 steps); the run options apply with --model.",
        epilog="Sizes are WIDTHxHEIGHT in pixels. Text encoders are excluded; the VAE decode only with --vae.",
    )
    add_fields(
        ap,
        RunSettings,
        skip=("label",),
        model={"choices": sorted(ARCH), "default": None, "help": "base model (conf/base name); default: the table"},
        target={"default": "1280x720", "help": "target size (default 1280x720)"},
        frames={"default": None, "help": "frames (default: 81 Wan, 129 HunyuanVideo)"},
        prefix={"help": "prefix size (default 832x480 Wan, 848x480 HunyuanVideo)"},
        preview={"default": "416x240", "help": "preview size (default 416x240)"},
        window={"type": _window, "help": "Refiner window wt,wh,ww in tokens (default: the preset's)"},
        attn_impl={
            "flag": "--impl",
            "choices": [i for i in IMPLS if i != "auto"],
            "help": "window attention form counted: exact partition or padded windows",
        },
        rule={"choices": RULES},
        cfg={"type": str, "choices": ("auto", "on", "off"), "default": "auto"},
        cfg_low={"flag": "--no-low-cfg"},
    )
    ap.add_argument("--measured", help=f"toy accel results for the composed table (default {MEASURED})")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.model is None:
            settings = default_settings()
            for st in settings:
                st.vae = args.vae
        else:
            fam = BaseArch.from_name(args.model).family
            settings = [
                from_args(
                    RunSettings,
                    args,
                    frames=args.frames or (81 if fam == "wan" else 129),
                    cfg=None if args.cfg == "auto" else args.cfg == "on",
                    target=parse_size(args.target),
                    prefix=parse_size(args.prefix) if args.prefix else None,
                    preview=parse_size(args.preview),
                )
            ]
        runs = [run_costs(st) for st in settings]
        measured = measured_accel(args.measured)
        composed = composed_speedups(measured) if args.model is None else None
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        print(
            json.dumps(
                {
                    "convention": "1 multiply-add = 2 FLOPs; matmul/conv/attention only; forward only",
                    "runs": runs,
                    "paper": paper_comparison(runs),
                    "composed": composed,
                    "measured": measured,
                },
                indent=2,
            )
        )
    else:
        print(format_table(runs))
        if composed is not None:
            print(format_composed(composed, measured))


if __name__ == "__main__":
    main()
