"""The SURF Refiner: a DiT with shifted-window self-attention on the target latent grid (DESIGN 1, 3.3, 3.4).

Input is the channel concat of the bridge state x_t and the upsampled preview `cond`; output is the
velocity v = x_start - x_hr. Blocks mirror diffusers' WanTransformerBlock (adaLN table + shared time
projection, qk RMSNorm across heads, interleaved 3D RoPE, optional text cross-attention, tanh-GELU FFN)
with parameter names that match Wan's, so `init_from_wan` is a near one-to-one copy. Even blocks
attend in plain windows, odd blocks in windows shifted by half a window.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from surf_train.common.errors import ConfigError
from surf_train.models.windows import IMPLS, Size3, window_attention

EPS = 1e-6  # Wan's eps for every norm
T_SCALE = 1000.0  # t in [0, 1] is embedded as Wan's timestep t * 1000, so Wan's time MLP transfers


@dataclass
class RefinerConfig:
    """Refiner hyper-parameters; defaults are the `tiny` preset."""

    in_channels: int = 16  # latent channels C (output has C too; input is 2C: x_t and cond)
    patch_size: Size3 = (1, 2, 2)  # (pt, ph, pw) latent pixels per token
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0  # ffn_dim = round(dim * mlp_ratio)
    window: Size3 = (2, 4, 4)  # (wt, wh, ww) in tokens; >= grid extent or <= 0: whole axis
    text_dim: int = 32  # text encoder width; 0 = no text cross-attention
    freq_dim: int = 256  # sinusoidal timestep features
    rope_theta: float = 10000.0
    qk_norm: bool = True
    grad_checkpointing: bool = False
    attn_impl: str = "auto"  # "mask" | "grouped" | "auto" (see windows.window_attention)
    ffn_conv: int = 0  # k > 0: a k x k depthwise conv (per frame) in each FFN, across window cuts; 0: none

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        self.window = tuple(int(w) for w in self.window)  # type: ignore[assignment]
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size must be 3 positive ints, got {self.patch_size}")
        if len(self.window) != 3:
            raise ConfigError(f"window must be 3 ints (wt, wh, ww), got {self.window}")
        if self.dim % self.heads:
            raise ConfigError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"head_dim {self.head_dim} must be even and >= 6 for 3D RoPE")
        if self.attn_impl not in IMPLS:
            raise ConfigError(f"attn_impl {self.attn_impl!r} not in {IMPLS}")
        if self.ffn_conv < 0 or (self.ffn_conv and self.ffn_conv % 2 == 0):
            raise ConfigError(f"ffn_conv must be 0 (none) or an odd kernel size, got {self.ffn_conv}")
        if min(self.in_channels, self.dim, self.depth, self.freq_dim) < 1 or self.text_dim < 0:
            raise ConfigError(f"sizes must be positive: {self}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def ffn_dim(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    @property
    def rope_dims(self) -> Size3:
        """head_dim split over (t, h, w) as in Wan: h = w = 2 * (head_dim // 6), t gets the rest."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefinerConfig:
        """Inverse of to_dict; unknown keys are an error."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown RefinerConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RefinerConfig:
        """A named preset (conf/model/<name>.yaml) with field overrides."""
        if name not in presets():
            raise ConfigError(f"unknown refiner preset {name!r}; choose from {sorted(presets())}")
        return cls(**{**presets()[name], **overrides})


def refiner_config(model: dict) -> RefinerConfig:
    """The training config's `model` group {"preset": name, **overrides} -> RefinerConfig."""
    model = dict(model)
    unset = [k for k in ("in_channels", "text_dim") if k in model and model[k] is None]
    if unset:
        raise ConfigError(
            f"model.{' and model.'.join(unset)} unset (null): `python -m surf_train` reads them from "
            f"the shards; elsewhere give them explicitly"
        )
    return RefinerConfig.preset(model.pop("preset", "tiny"), **model)


@functools.cache
def presets() -> dict[str, dict[str, Any]]:
    """The named Refiner presets: conf/model/<name>.yaml (their one home), less `preset` and the sizes left null
    there (read from the shards in training; the dataclass defaults elsewhere)."""
    import yaml

    from surf_train import CONF_DIR

    out = {}
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        d = yaml.safe_load(path.read_text())
        name = d.pop("preset")
        out[name] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if v is not None}
    return out


# --- pure functions ----------------------------------------------------------------------------


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


def text_padding_mask(text: torch.Tensor) -> torch.Tensor:
    """(B, L) True for real tokens of (B, L, D) text embeddings: the shards, the readers' per-batch padding and the
    Wan pipeline's encode_prompt all pad with zero rows, so training and generation see the same tokens."""
    return text.abs().amax(-1) > 0


def patch_grid(shape: tuple[int, ...], patch: Size3) -> Size3:
    """Token grid (F', H', W') of a (B, C, F, H, W) shape."""
    return tuple(s // p for s, p in zip(shape[2:], patch))  # type: ignore[return-value]


def unpatchify(x: torch.Tensor, grid: Size3, patch: Size3) -> torch.Tensor:
    """(B, N, pt*ph*pw*C) tokens -> (B, C, F, H, W), Wan's channel-last patch order."""
    b = x.shape[0]
    x = x.reshape(b, *grid, *patch, -1)  # (B, F', H', W', pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', pt, H', ph, W', pw)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- modules -----------------------------------------------------------------------------------


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


def _qk_norm(cfg: RefinerConfig) -> nn.Module:
    # Wan's "rms_norm_across_heads": one RMSNorm over all heads together.
    return FP32RMSNorm(cfg.dim, eps=EPS) if cfg.qk_norm else nn.Identity()


class SelfAttention(nn.Module):
    """Window self-attention with RoPE; names as Wan's attn1 (to_out is Wan's to_out.0)."""

    def __init__(self, cfg: RefinerConfig, shift: bool):
        super().__init__()
        self.heads, self.window, self.shift, self.impl = cfg.heads, cfg.window, shift, cfg.attn_impl
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = _qk_norm(cfg), _qk_norm(cfg)

    def forward(self, x: torch.Tensor, grid: Size3, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = apply_rope(self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1)), *rope)  # (B, N, heads, d)
        k = apply_rope(self.norm_k(self.to_k(x)).unflatten(-1, (self.heads, -1)), *rope)
        v = self.to_v(x).unflatten(-1, (self.heads, -1))
        o = window_attention(q, k, v, grid, self.window, self.shift, self.impl)  # (B, N, heads, d)
        return self.to_out(o.flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to projected text tokens; names as Wan's attn2."""

    def __init__(self, cfg: RefinerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = _qk_norm(cfg), _qk_norm(cfg)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None) -> torch.Tensor:
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, N, d)
        k = self.norm_k(self.to_k(ctx)).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, L, d)
        v = self.to_v(ctx).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        mask = None
        if ctx_mask is not None:
            has_text = ctx_mask.any(-1)  # (B,)
            # A sample with no valid text token attends to all (no NaN row) and its output is zeroed.
            mask = (ctx_mask | ~has_text[:, None])[:, None, None, :]  # (B, 1, 1, L)
        o = self.to_out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))  # (B, N, D)
        if ctx_mask is not None:
            o = o * has_text[:, None, None].to(o.dtype)  # as if text were None for that sample
        return o


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
    """adaLN block: window self-attention, optional text cross-attention, FFN."""

    def __init__(self, cfg: RefinerConfig, index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=EPS, elementwise_affine=False)
        self.attn1 = SelfAttention(cfg, shift=index % 2 == 1)
        self.has_text = bool(cfg.text_dim)
        if self.has_text:
            self.norm2 = FP32LayerNorm(cfg.dim, eps=EPS)
            self.attn2 = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=EPS, elementwise_affine=False)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.ffn_conv)
        # Rows: shift, scale, gate (self-attn), shift, scale, gate (FFN); added to the time projection.
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

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

    def __init__(self, cfg: RefinerConfig):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = _TimeMLP(cfg.freq_dim, cfg.dim, nn.SiLU())
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        if cfg.text_dim:
            self.text_embedder = _TimeMLP(cfg.text_dim, cfg.dim, nn.GELU(approximate="tanh"))

    def forward(self, t: torch.Tensor, text: torch.Tensor | None):
        """t (B,) in [0, 1] -> temb (B, D), mod (B, 6, D), text (B, L, D) | None."""
        # time_embedder may be float32 beside a bf16 time_proj (Refiner._keep_in_fp32_modules)
        temb = self.time_embedder(
            timestep_embedding(t * T_SCALE, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        )
        mod = self.time_proj(F.silu(temb).to(self.time_proj.weight.dtype)).unflatten(1, (6, -1))
        return temb, mod, (self.text_embedder(text) if text is not None else None)


class Refiner(ModelMixin, ConfigMixin):
    """Shifted-window DiT: (x_t, t, cond, text) -> velocity, all latents (B, C, F, H, W).

    A diffusers model (save_pretrained / from_pretrained); its config is RefinerConfig's fields, built from
    one with `Refiner.from_cfg`. `grad_checkpointing` is a training switch (enable_gradient_checkpointing),
    not part of the saved config.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["RefinerBlock"]
    # kept float32 by from_pretrained(torch_dtype=bf16): adaLN tables, norm weights, the timestep MLP (as Wan)
    _keep_in_fp32_modules = ["scale_shift_table", "norm_q", "norm_k", "norm2", "time_embedder"]
    ignore_for_config = ["grad_checkpointing"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,  # defaults: RefinerConfig's (a test checks they agree)
        patch_size: Size3 = (1, 2, 2),
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        window: Size3 = (2, 4, 4),
        text_dim: int = 32,
        freq_dim: int = 256,
        rope_theta: float = 10000.0,
        qk_norm: bool = True,
        attn_impl: str = "auto",
        grad_checkpointing: bool = False,
        ffn_conv: int = 0,
    ):
        super().__init__()
        self._cfg = cfg = RefinerConfig(
            in_channels=in_channels,
            patch_size=patch_size,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            window=window,
            text_dim=text_dim,
            freq_dim=freq_dim,
            rope_theta=rope_theta,
            qk_norm=qk_norm,
            attn_impl=attn_impl,
            ffn_conv=ffn_conv,
        )  # validates
        c, d = cfg.in_channels, cfg.dim
        self.patch_embedding = nn.Conv3d(2 * c, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList(RefinerBlock(cfg, i) for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, eps=EPS, elementwise_affine=False)
        self.proj_out = nn.Linear(d, c * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)  # final (shift, scale)
        self.zero_init()
        self.gradient_checkpointing = False  # per-block activation checkpointing, set by diffusers' switch
        if grad_checkpointing:
            self.enable_gradient_checkpointing()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> Refiner:
        """diffusers' from_pretrained; a directory of the first export format gets a clear error instead."""
        d = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if (d / "refiner.safetensors").is_file() and not any(d.glob("diffusion_pytorch_model*.safetensors")):
            raise ConfigError(
                f"{d}: an export of the first SURF format (refiner.safetensors); load it with "
                f"surf_train.export.load_refiner or convert it: python -m surf_train.export --convert "
                f"{d} NEW_DIR"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_cfg(cls, cfg: RefinerConfig) -> Refiner:
        """The one conversion RefinerConfig -> Refiner (its inverse is `.cfg`)."""
        return cls(**cfg.to_dict())

    @classmethod
    def keeps_fp32(cls, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype parameter `name` gets when the model is cast to dtype (float32 for the kept modules)."""
        return torch.float32 if any(m in name.split(".") for m in cls._keep_in_fp32_modules) else dtype

    @torch.no_grad()
    def to_dtype(self, dtype: torch.dtype) -> Refiner:
        """Cast as from_pretrained(torch_dtype=dtype) would load: the kept modules stay float32. (`.to(dtype)`
        casts everything, and diffusers warns about it.)"""
        for name, p in self.named_parameters():
            p.data = p.data.to(self.keeps_fp32(name, dtype))
        return self

    @property
    def cfg(self) -> RefinerConfig:
        """This model's RefinerConfig, grad_checkpointing as currently switched."""
        return dataclasses.replace(self._cfg, grad_checkpointing=self.gradient_checkpointing)

    @torch.no_grad()
    def zero_init(self) -> None:
        """Zero the output projection and every adaLN gate: the untrained model outputs 0 (DiT)."""
        d = self._cfg.dim
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        tp = self.condition_embedder.time_proj
        for row in (2, 5):  # gate rows of the (6, D) modulation
            tp.weight[row * d : (row + 1) * d].zero_()
            tp.bias[row * d : (row + 1) * d].zero_()
            for blk in self.blocks:
                blk.scale_shift_table[:, row].zero_()

    def _check(self, x_t, t, cond, text, text_mask) -> None:
        cfg = self._cfg
        c, p = cfg.in_channels, cfg.patch_size
        if x_t.ndim != 5 or x_t.shape[1] != c:
            raise ValueError(f"x_t must be (B, {c}, F, H, W), got {tuple(x_t.shape)}")
        if cond.shape != x_t.shape:
            raise ValueError(f"cond shape {tuple(cond.shape)} must equal x_t shape {tuple(x_t.shape)}")
        if any(s % q for s, q in zip(x_t.shape[2:], p)):
            raise ValueError(f"latent (F, H, W) = {tuple(x_t.shape[2:])} is not divisible by patch_size {p}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        if text is not None:
            if not cfg.text_dim:
                raise ValueError("text given but the refiner has text_dim=0 (no cross-attention)")
            if text.ndim != 3 or text.shape[0] != x_t.shape[0] or text.shape[2] != cfg.text_dim:
                raise ValueError(f"text must be (B, L, {cfg.text_dim}), got {tuple(text.shape)}")
            if text_mask is not None and text_mask.shape != text.shape[:2]:
                raise ValueError(f"text_mask must be (B, L) = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")

    def forward(
        self,
        x_t: torch.Tensor,  # (B, C, F, H, W)
        t: torch.Tensor,  # (B,) in [0, 1]; 1 = x_start, 0 = target
        cond: torch.Tensor,  # (B, C, F, H, W) upsampled preview
        text: torch.Tensor | None = None,  # (B, L, text_dim)
        text_mask: torch.Tensor | None = None,  # (B, L) bool, True = real token; None: the non-zero rows of text
    ) -> torch.Tensor:
        self._check(x_t, t, cond, text, text_mask)
        if text is not None and text_mask is None:
            text_mask = text_padding_mask(text)
        cfg = self._cfg
        grid = patch_grid(x_t.shape, cfg.patch_size)
        x = self.patch_embedding(torch.cat([x_t, cond], dim=1))  # (B, D, F', H', W')
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        temb, mod, text = self.condition_embedder(t, text)  # (B, D), (B, 6, D), (B, L, D)
        rope = rope_angles(grid, cfg.rope_dims, cfg.rope_theta, x.device)  # 2 x (N, head_dim/2)
        if text_mask is not None:
            text_mask = text_mask.bool()
        for blk in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(blk, x, mod, grid, rope, text, text_mask)
            else:
                x = blk(x, mod, grid, rope, text, text_mask)
        shift, scale = (self.scale_shift_table + temb[:, None]).unsqueeze(2).unbind(1)  # (B, 1, D)
        x = self.proj_out((self.norm_out(x) * (1 + scale) + shift).to(x.dtype))  # (B, N, pt*ph*pw*C)
        return unpatchify(x, grid, cfg.patch_size)

    @classmethod
    def from_wan_transformer(cls, wan: Any, **overrides: Any) -> tuple[Refiner, WanInitReport]:
        """Refiner shaped like a diffusers WanTransformer3DModel (module or saved directory), initialised from it."""
        if isinstance(wan, (str, bytes)) or hasattr(wan, "__fspath__"):
            from diffusers import WanTransformer3DModel

            wan = WanTransformer3DModel.from_pretrained(wan)
        model = cls.from_cfg(config_from_wan(dict(wan.config), **overrides))
        return model, init_from_wan(model, wan.state_dict())


# --- initialisation from Wan -------------------------------------------------------------------


@dataclass
class WanInitReport:
    """What init_from_wan did: refiner keys copied, Wan keys skipped (with why), refiner keys left as built."""

    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    not_initialised: list[str] = field(default_factory=list)


def config_from_wan(wan_config: dict[str, Any], **overrides: Any) -> RefinerConfig:
    """RefinerConfig with a Wan transformer's widths (dim, heads, ffn, text, patch, depth); overrides win."""
    dim = wan_config["num_attention_heads"] * wan_config["attention_head_dim"]
    base = dict(
        in_channels=wan_config["in_channels"],
        patch_size=tuple(wan_config["patch_size"]),
        dim=dim,
        depth=wan_config["num_layers"],
        heads=wan_config["num_attention_heads"],
        mlp_ratio=wan_config["ffn_dim"] / dim,
        text_dim=wan_config["text_dim"],
        freq_dim=wan_config["freq_dim"],
        qk_norm=wan_config.get("qk_norm") is not None,
    )
    return RefinerConfig(**{**base, **overrides})


_WAN_RENAMES = (("to_out.0.", "to_out."), ("ffn.net.0.proj.", "ffn.fc1."), ("ffn.net.2.", "ffn.fc2."))


def _wan_to_refiner_key(key: str, block_map: dict[int, int]) -> str | None:
    for a, b in _WAN_RENAMES:
        key = key.replace(a, b)
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        if int(i) not in block_map:
            return None
        key = f"blocks.{block_map[int(i)]}.{rest}"
    return key


@torch.no_grad()
def init_from_wan(
    refiner: Refiner, wan_state_dict: dict[str, torch.Tensor], wan_blocks: list[int] | None = None
) -> WanInitReport:
    """Copy every Wan tensor whose role and shape match; preview (cond) input channels get zeros.

    Refiner block i takes Wan block wan_blocks[i] (default: the first `depth` blocks). The Wan patch
    embedding fills the x_t input channels and the cond channels are zeroed, so at init the refiner
    is Wan on x_t (with windowed attention). The output projection and adaLN gates are copied too
    (not zero): a pretrained model starts from its own prediction.
    """
    depth = refiner.cfg.depth
    wan_blocks = list(range(depth)) if wan_blocks is None else list(wan_blocks)
    if len(wan_blocks) != depth:
        raise ConfigError(f"wan_blocks has {len(wan_blocks)} entries, refiner depth is {depth}")
    block_map = {w: i for i, w in enumerate(wan_blocks)}
    own = refiner.state_dict()
    report = WanInitReport()
    c = refiner.cfg.in_channels
    for wkey, src in wan_state_dict.items():
        key = _wan_to_refiner_key(wkey, block_map)
        if key is None:
            report.skipped[wkey] = "block not used"
            continue
        if key not in own:
            report.skipped[wkey] = "no refiner counterpart"
            continue
        dst = own[key]
        if key == "patch_embedding.weight" and dst[:, :c].shape == src.shape and dst.shape[1] == 2 * c:
            dst[:, :c].copy_(src)  # (D, 2C, pt, ph, pw): x_t channels from Wan
            dst[:, c:].zero_()  # cond channels: zero, the preview enters through training
        elif dst.shape == src.shape:
            dst.copy_(src)
        else:
            report.skipped[wkey] = f"shape {tuple(src.shape)} != refiner {tuple(dst.shape)}"
            continue
        report.copied.append(key)
    report.not_initialised = [k for k in own if k not in set(report.copied)]
    return report
