"""The Refiner's building blocks, named as diffusers' Wan modules so `init_from_wan` is a near one-to-one copy:
timestep features, interleaved 3D RoPE, float32 norms, window self-attention, text cross-attention, the tanh-GELU
FFN, the adaLN block and the condition embedder (docs/method.md, "Shifted-window attention"). The Refiner that
stacks them, and its config, are in `refiner`.

The two attentions follow diffusers' conventions (AttentionModuleMixin modules whose arithmetic is a processor
calling `attention_dispatch.dispatch_attention_fn` on (B, S, heads, d)), so diffusers' attention backends,
processor API and QKV fusion apply to them as to Wan's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn

from surf_train.models.windows import Size3, window_attention

EPS = 1e-6  # Wan's eps for every norm
T_SCALE = 1000.0  # t in [0, 1] is embedded as Wan's timestep t * 1000, so Wan's time MLP transfers


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] of t (B,) -> (B, dim), as diffusers' Timesteps(flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(grid: Size3, dims: Size3, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, sum(dims) // 2) of 3D RoPE at global token positions, axes (t, h, w) in that order."""
    per_axis = []
    for n, d in zip(grid, dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)  # (d/2,)
        per_axis.append(torch.arange(n, dtype=torch.float64, device=device)[:, None] * freqs[None])  # (n, d/2)
    t, h, w = grid
    ang = torch.cat(
        [
            per_axis[0][:, None, None].expand(t, h, w, -1),
            per_axis[1][None, :, None].expand(t, h, w, -1),
            per_axis[2][None, None, :].expand(t, h, w, -1),
        ],
        dim=-1,
    ).reshape(t * h * w, -1)  # (N, head_dim/2)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, N, heads, d) by angles (N, d/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, heads, d/2) each
    cos, sin = cos[:, None], sin[:, None]  # (N, 1, d/2)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class FP32RMSNorm(nn.RMSNorm):
    """RMSNorm computed in float32, output in the input's dtype (its weight may be float32 beside bf16 layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), self.normalized_shape, w, self.eps).type_as(x)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, output in the input's dtype (as diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def _qk_norm(dim: int, on: bool) -> nn.Module:
    # Wan's "rms_norm_across_heads": one RMSNorm over all heads together.
    return FP32RMSNorm(dim, eps=EPS) if on else nn.Identity()


def _projections(attn: nn.Module, x: torch.Tensor, ctx: torch.Tensor | None):
    """q, k, v (B, S, D) of x (keys and values of ctx for cross-attention); from to_qkv / to_kv once
    fuse_qkv_projections() has fused them, as diffusers' Wan attention does."""
    if attn.fused_projections:
        if not attn.is_cross_attention:
            return attn.to_qkv(x).chunk(3, dim=-1)
        return (attn.to_q(x), *attn.to_kv(ctx).chunk(2, dim=-1))
    ctx = x if ctx is None else ctx
    return attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)


class WindowAttnProcessor:
    """Window self-attention with RoPE. Each window-size group is one call of diffusers' attention dispatch on
    (windows, Lw, heads, d), so `set_attention_backend` / the `attention_backend` context pick its kernel."""

    _attention_backend = None
    _parallel_config = None  # context parallelism would split tokens across windows: not supported

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None) -> torch.Tensor:
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, backend=self._attention_backend)

    def __call__(
        self,
        attn: SelfAttention,
        hidden_states: torch.Tensor,  # (B, N, D)
        encoder_hidden_states: None = None,
        attention_mask: None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin (N, d/2)
        grid: Size3 | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or grid is None or rotary_emb is None:
            raise ValueError("window self-attention takes hidden_states, rotary_emb and grid only")
        q, k, v = _projections(attn, hidden_states, None)
        q = apply_rope(attn.norm_q(q).unflatten(-1, (attn.heads, -1)), *rotary_emb)  # (B, N, heads, d)
        k = apply_rope(attn.norm_k(k).unflatten(-1, (attn.heads, -1)), *rotary_emb)
        v = v.unflatten(-1, (attn.heads, -1))
        o = window_attention(q, k, v, grid, attn.window, attn.shift, attn.impl, self.attend)  # (B, N, heads, d)
        return attn.to_out(o.flatten(2))


class TextAttnProcessor:
    """Cross-attention from video tokens to text tokens through diffusers' attention dispatch. A (B, L) keep-mask
    goes to the kernel as (B, 1, 1, L); the Refiner passes none when no token is padding (flash takes no mask)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: CrossAttention,
        hidden_states: torch.Tensor,  # (B, N, D)
        encoder_hidden_states: torch.Tensor,  # (B, L, D) projected text
        attention_mask: torch.Tensor | None = None,  # (B, L) bool, True = real token
    ) -> torch.Tensor:
        q, k, v = _projections(attn, hidden_states, encoder_hidden_states)
        q = attn.norm_q(q).unflatten(-1, (attn.heads, -1))  # (B, N, heads, d)
        k = attn.norm_k(k).unflatten(-1, (attn.heads, -1))  # (B, L, heads, d)
        v = v.unflatten(-1, (attn.heads, -1))
        mask = None
        if attention_mask is not None:
            has_text = attention_mask.any(-1)  # (B,)
            # A sample with no valid text token attends to all (no NaN row) and its output is zeroed.
            mask = (attention_mask | ~has_text[:, None])[:, None, None, :]  # (B, 1, 1, L)
        o = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend)
        o = attn.to_out(o.flatten(2))  # (B, N, D)
        if attention_mask is not None:
            o = o * has_text[:, None, None].to(o.dtype)  # as if text were None for that sample
        return o


class _Attention(nn.Module, AttentionModuleMixin):
    """q, k, v, out projections and qk norms named as Wan's attn1 / attn2 (to_out is Wan's to_out.0); the
    arithmetic is the processor's (diffusers' AttentionModuleMixin: set_processor, set_attention_backend,
    fuse_projections)."""

    use_bias = True  # fuse_projections copies the biases

    def __init__(self, dim: int, heads: int, qk_norm: bool, processor):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = _qk_norm(dim, qk_norm), _qk_norm(dim, qk_norm)
        self.set_processor(processor or self._default_processor_cls())


class SelfAttention(_Attention):
    """Window self-attention with RoPE (Wan's attn1); windows shifted by half with `shift`."""

    _default_processor_cls = WindowAttnProcessor
    _available_processors = [WindowAttnProcessor]
    is_cross_attention = False

    def __init__(self, dim: int, heads: int, window: Size3, shift: bool, impl: str, qk_norm: bool, processor=None):
        super().__init__(dim, heads, qk_norm, processor)
        self.window, self.shift, self.impl = window, shift, impl

    def forward(self, x: torch.Tensor, grid: Size3, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.processor(self, x, rotary_emb=rope, grid=grid)


class CrossAttention(_Attention):
    """Attention from video tokens to projected text tokens (Wan's attn2)."""

    _default_processor_cls = TextAttnProcessor
    _available_processors = [TextAttnProcessor]
    is_cross_attention = True

    def __init__(self, dim: int, heads: int, qk_norm: bool, processor=None):
        super().__init__(dim, heads, qk_norm, processor)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None) -> torch.Tensor:
        return self.processor(self, x, ctx, ctx_mask)


class FeedForward(nn.Module):
    """tanh-GELU MLP; fc1/fc2 are Wan's ffn.net.0.proj / ffn.net.2.

    With conv = k > 0 the hidden features also get a residual k x k depthwise conv over each frame's token
    grid (a LeFF-style FFN): neighbouring tokens of different windows mix there too, not only through the
    shifted windows. It starts at zero, so a Wan initialisation is unchanged.
    """

    def __init__(self, dim: int, hidden: int, conv: int = 0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.conv = None
        if conv:
            self.conv = nn.Conv2d(hidden, hidden, conv, padding=conv // 2, groups=hidden)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, grid: Size3) -> torch.Tensor:
        h = F.gelu(self.fc1(x), approximate="tanh")  # (B, N, hidden)
        if self.conv is not None:
            b, (f, gh, gw) = h.shape[0], grid
            g = h.transpose(1, 2).reshape(b, -1, f, gh, gw).transpose(1, 2).flatten(0, 1)  # (B*F', hidden, H', W')
            g = self.conv(g).unflatten(0, (b, f)).permute(0, 1, 3, 4, 2).reshape(h.shape)
            h = h + g
        return self.fc2(h)


class RefinerBlock(nn.Module):
    """adaLN block: window self-attention (windows shifted by half with `shift`), optional text cross-attention
    (text_dim > 0), FFN."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        *,
        window: Size3,
        shift: bool,
        attn_impl: str,
        qk_norm: bool,
        text_dim: int,
        ffn_conv: int,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS, elementwise_affine=False)
        self.attn1 = SelfAttention(dim, heads, window, shift, attn_impl, qk_norm)
        self.has_text = bool(text_dim)
        if self.has_text:
            self.norm2 = FP32LayerNorm(dim, eps=EPS)
            self.attn2 = CrossAttention(dim, heads, qk_norm)
        self.norm3 = nn.LayerNorm(dim, eps=EPS, elementwise_affine=False)
        self.ffn = FeedForward(dim, ffn_dim, ffn_conv)
        # Rows: shift, scale, gate (self-attn), shift, scale, gate (FFN); added to the time projection.
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, D)
        mod: torch.Tensor,  # (B, 6, D) time projection
        grid: Size3,
        rope: tuple[torch.Tensor, torch.Tensor],
        text: torch.Tensor | None,  # (B, L, D) projected
        text_mask: torch.Tensor | None,  # (B, L) bool
    ) -> torch.Tensor:
        # The modulation runs in the table's dtype (float32 when loaded with torch_dtype=bf16, see
        # Refiner._keep_in_fp32_modules); the residual stream stays in x's dtype. All no-ops in one dtype.
        mod = (self.scale_shift_table + mod).unsqueeze(2)  # (B, 6, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)  # (B, 1, D) each
        h = (self.norm1(x) * (1 + scale1) + shift1).to(x.dtype)
        x = x + (gate1 * self.attn1(h, grid, rope)).to(x.dtype)
        if text is not None and self.has_text:
            x = x + self.attn2(self.norm2(x), text, text_mask)
        h = (self.norm3(x) * (1 + scale2) + shift2).to(x.dtype)
        return x + (gate2 * self.ffn(h, grid)).to(x.dtype)


class _TimeMLP(nn.Module):
    def __init__(self, d_in: int, dim: int, act: nn.Module):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(d_in, dim), act, nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep MLP, shared adaLN time projection and text projection (Wan's condition_embedder)."""

    def __init__(self, freq_dim: int, dim: int, text_dim: int, kinds: int = 0):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = _TimeMLP(freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        if text_dim:
            self.text_embedder = _TimeMLP(text_dim, dim, nn.GELU(approximate="tanh"))
        if kinds:  # the preview's kind, added to the time embedding; zero at init: the model starts without it
            self.kind_embedder = nn.Embedding(kinds, dim)
            nn.init.zeros_(self.kind_embedder.weight)

    def forward(self, t: torch.Tensor, text: torch.Tensor | None, kind: torch.Tensor | None = None):
        """t (B,) in [0, 1], kind (B,) indices or None -> temb (B, D), mod (B, 6, D), text (B, L, D) | None."""
        # time_embedder may be float32 beside a bf16 time_proj (Refiner._keep_in_fp32_modules)
        temb = self.time_embedder(
            timestep_embedding(t * T_SCALE, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        )
        if kind is not None:
            temb = temb + self.kind_embedder(kind).to(temb.dtype)
        mod = self.time_proj(F.silu(temb).to(self.time_proj.weight.dtype)).unflatten(1, (6, -1))
        return temb, mod, (self.text_embedder(text) if text is not None else None)
