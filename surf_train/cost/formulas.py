"""Analytic forward FLOPs of one call of the base DiTs (Wan, HunyuanVideo) and of the Refiner, per component.

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
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from diffusers import HunyuanVideo15Transformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

from surf_train.common.errors import ConfigError
from surf_train.models.refiner import RefinerConfig
from surf_train.models.windows import IMPLS, Size3, clamp_window, runs, shift_size

PFLOP = 1e15


def constructor_defaults(cls: type, keys: str) -> dict[str, Any]:
    """`cls.__init__`'s defaults for the space-separated `keys` (a diffusers model's config keys)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: params[k].default for k in keys.split()}


# diffusers' WanTransformer3DModel and HunyuanVideoTransformer3DModel constructor defaults are the Wan 2.1 14B and
# HunyuanVideo values (tests/test_flops.py checks them against the published configs): they fill in the keys a
# partial config leaves out.
WAN_DEFAULTS = constructor_defaults(
    WanTransformer3DModel,
    "patch_size num_attention_heads attention_head_dim in_channels out_channels text_dim freq_dim ffn_dim num_layers "
    "image_dim added_kv_proj_dim",
)
HUNYUAN_DEFAULTS = constructor_defaults(
    HunyuanVideoTransformer3DModel,
    "in_channels out_channels num_attention_heads attention_head_dim num_layers num_single_layers num_refiner_layers "
    "mlp_ratio patch_size patch_size_t guidance_embeds text_embed_dim pooled_projection_dim image_condition_type",
)

# HunyuanVideo15Transformer3DModel's defaults are the released 8.3B (diffusers' conversion script changes only
# target_size and task_type per checkpoint)
HUNYUAN15_DEFAULTS = constructor_defaults(
    HunyuanVideo15Transformer3DModel,
    "in_channels out_channels num_attention_heads attention_head_dim num_layers num_refiner_layers mlp_ratio "
    "patch_size patch_size_t text_embed_dim text_embed_2_dim image_embed_dim use_meanflow",
)
# the pipeline's fixed context besides the Qwen tokens: ByT5 glyph tokens (tokenizer_2_max_length) and SigLIP
# image tokens (vision_num_semantic_tokens, zero and masked in text to video but computed)
HUNYUAN15_GLYPH_LEN, HUNYUAN15_IMAGE_LEN = 256, 729


def token_grid(latent: Sequence[int], patch: Size3) -> Size3:
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
    """FLOPs of all components together."""
    return sum(parts.values())


# --- one transformer call ------------------------------------------------------------------------


def wan_flops(config: Mapping[str, Any], latent: Sequence[int], text_len: int = 512, batch: int = 1) -> dict[str, int]:
    """FLOPs of one WanTransformer3DModel forward (text-to-video) on a (C, F, H, W) latent, per component.

    Components: patch_embed (Conv3d), time_embed (time MLP + the shared 6*D adaLN projection, one row
    per sample), text_embed (the 2-layer text projection of all `text_len` tokens, recomputed every
    call as diffusers does), self_attn_proj (q, k, v, out), self_attn_sdpa (N x N scores + sum),
    cross_attn_proj (q and out on video tokens, k and v on text tokens), cross_attn_sdpa (N x L),
    ffn (two linears), proj_out. Config keys are diffusers' (missing ones take WAN_DEFAULTS), plus WanPipeline's
    `expand_timesteps` (Wan 2.2 TI2V-5B): a timestep per token, so the time MLP and the 6*D projection run on
    every token's row instead of one row per sample.
    """
    c = {**WAN_DEFAULTS, **dict(config)}
    if c.get("image_dim") is not None or c.get("added_kv_proj_dim") is not None:
        raise ConfigError("image-to-video Wan (image_dim / added_kv_proj_dim) is not modelled; text-to-video only")
    patch = tuple(c["patch_size"])
    grid = token_grid(latent, patch)  # type: ignore[arg-type]
    n, l, b = math.prod(grid), int(text_len), int(batch)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    pvol = math.prod(patch)
    c_in, c_out = latent[0], (c.get("out_channels") or c["in_channels"])
    if c_in != c["in_channels"]:
        raise ConfigError(f"latent has {c_in} channels, the Wan config {c['in_channels']}")
    layers = c["num_layers"]
    t_rows = n if c.get("expand_timesteps") else 1  # time-embedding rows per sample
    parts = {
        "patch_embed": _lin(n, c_in * pvol, d),
        "time_embed": _time_mlp(t_rows, c["freq_dim"], d) + _lin(t_rows, d, 6 * d),
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
    grid = token_grid(latent, patch)
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


def hunyuan15_flops(
    config: Mapping[str, Any], latent: Sequence[int], text_len: int = 1000, batch: int = 1
) -> dict[str, int]:
    """FLOPs of one HunyuanVideo15Transformer3DModel forward (text to video) on a (C, F, H, W) latent.

    The transformer reads 2C + 1 channels (latent, conditioning latent, mask). Components: patch_embed; time_embed;
    token_refiner (on the `text_len` Qwen tokens, as HunyuanVideo's); glyph_embed (ByT5 projection, 256 tokens);
    image_embed (SigLIP projection, 729 tokens); adaln; double_proj, double_sdpa (joint attention over N + L
    tokens, L = text_len + 256 + 729, padding masked but computed), double_ffn; proj_out.
    """
    c = {**HUNYUAN15_DEFAULTS, **dict(config)}
    if c["use_meanflow"]:
        raise ConfigError("the step-distilled (meanflow) HunyuanVideo-1.5 is not modelled")
    p, pt = int(c["patch_size"]), int(c["patch_size_t"])
    patch = (pt, p, p)
    grid = token_grid(latent, patch)
    l1, l2, l3 = int(text_len), HUNYUAN15_GLYPH_LEN, HUNYUAN15_IMAGE_LEN
    n, l, b = math.prod(grid), l1 + l2 + l3, int(batch)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    m = int(d * c["mlp_ratio"])
    c_out = c.get("out_channels") or c["in_channels"]
    if latent[0] != c_out or c["in_channels"] != 2 * c_out + 1:
        raise ConfigError(f"latent has {latent[0]} channels, the HunyuanVideo-1.5 config {c_out} (in: 2C + 1)")
    keys = ("text_embed_dim", "text_embed_2_dim", "image_embed_dim", "num_layers", "num_refiner_layers")
    dt, dt2, di, nd, nr = (c[k] for k in keys)
    refiner_block = 4 * _lin(l1, d, d) + _sdpa(l1, l1, d) + _lin(l1, d, 4 * d) + _lin(l1, 4 * d, d) + _lin(1, d, 2 * d)
    parts = {
        "patch_embed": _lin(n, c["in_channels"] * math.prod(patch), d),
        "time_embed": _time_mlp(1, 256, d),
        "token_refiner": _time_mlp(1, 256, d) + _lin(1, dt, d) + _lin(1, d, d) + _lin(l1, dt, d) + nr * refiner_block,
        "glyph_embed": _lin(l2, dt2, 2048) + _lin(l2, 2048, 2048) + _lin(l2, 2048, d),
        "image_embed": _lin(l3, di, di) + _lin(l3, di, d),
        "adaln": nd * 2 * _lin(1, d, 6 * d) + _lin(1, d, 2 * d),
        "double_proj": nd * (4 * _lin(n, d, d) + 4 * _lin(l, d, d)),
        "double_sdpa": nd * _sdpa(n + l, n + l, d),
        "double_ffn": nd * (_lin(n, d, m) + _lin(n, m, d) + _lin(l, d, m) + _lin(l, m, d)),
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
    if family == "hunyuan15":  # double-stream blocks only, each with its two 6D adaLN linears
        c, p = {**HUNYUAN15_DEFAULTS, **dict(config)}, hunyuan15_flops(config, latent, text_len)
        d = c["num_attention_heads"] * c["attention_head_dim"]
        inner = p["double_proj"] + p["double_sdpa"] + p["double_ffn"]
        return {"transformer_blocks": inner // c["num_layers"] + 2 * _lin(1, d, 6 * d)}
    c, p = {**HUNYUAN_DEFAULTS, **dict(config)}, hunyuan_flops(config, latent, text_len)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    nd, ns = c["num_layers"], c["num_single_layers"]
    # each block holds its own adaLN linears (two 6D in a double block, one 3D in a single block)
    return {
        "transformer_blocks": (p["double_proj"] + p["double_sdpa"] + p["double_ffn"]) // nd + 2 * _lin(1, d, 6 * d),
        "single_transformer_blocks": (p["single_proj"] + p["single_sdpa"]) // ns + _lin(1, d, 3 * d),
    }


def blocks_per_list(family: str, config: Mapping[str, Any]) -> dict[str, int]:
    """Blocks in each block list of the transformer, keyed as block_flops."""
    if family == "wan":
        return {"blocks": {**WAN_DEFAULTS, **dict(config)}["num_layers"]}
    if family == "hunyuan15":
        return {"transformer_blocks": {**HUNYUAN15_DEFAULTS, **dict(config)}["num_layers"]}
    c = {**HUNYUAN_DEFAULTS, **dict(config)}
    return {"transformer_blocks": c["num_layers"], "single_transformer_blocks": c["num_single_layers"]}


def hit_skipped_flops(family: str, config: Mapping[str, Any], latent: Sequence[int], text_len: int) -> int:
    """FLOPs one FirstBlockCache hit saves: it runs the first block only, every other block is skipped."""
    per_block = block_flops(family, config, latent, text_len)
    first = next(iter(per_block))
    n = blocks_per_list(family, config)
    return sum((n[k] - (k == first)) * f for k, f in per_block.items())


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
    fn = FLOPS_OF[family]
    n_of = blocks_per_list(family, config)
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
        out *= sum((z - a) // size * size * size for a, z, size in runs(g, w, s))
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
    grid = token_grid(latent, patch)  # type: ignore[arg-type]
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
    if kind.startswith("HunyuanVideo15"):
        return hunyuan15_flops(dict(transformer.config), latent, text_len, batch)
    if kind.startswith("Wan"):
        return wan_flops(dict(transformer.config), latent, text_len, batch)
    if kind.startswith("HunyuanVideo"):
        return hunyuan_flops(dict(transformer.config), latent, text_len, batch)
    raise ConfigError(f"no FLOPs model for {kind}; Wan and HunyuanVideo transformers only")


FLOPS_OF = {"wan": wan_flops, "hunyuan": hunyuan_flops, "hunyuan15": hunyuan15_flops}  # one call, by family
