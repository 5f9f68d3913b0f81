"""The SURF Refiner: a DiT with shifted-window self-attention on the target latent grid (docs/method.md, "Refiner
objective" and "Shifted-window attention"), its config and its presets.

Input is the channel concat of the bridge state x_t and the upsampled preview `cond`; output is the
velocity v = x_start - x_hr. Blocks (`blocks`) mirror diffusers' WanTransformerBlock (adaLN table + shared time
projection, qk RMSNorm across heads, interleaved 3D RoPE, optional text cross-attention, tanh-GELU FFN)
with parameter names that match Wan's, so `init_from_wan` is a near one-to-one copy. Even blocks
attend in plain windows, odd blocks in windows shifted by half a window.

The Refiner's settings are listed once, as the `register_to_config` signature of `Refiner.__init__` (diffusers
saves them as config.json); `RefinerConfig` is a dataclass derived from that signature. The presets `tiny`, `toy`
and `paper` live in conf/model/<name>.yaml and are read by Hydra only: training gets them as its composed `model`
node, other code through `presets()`, which composes the same group.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from surf_train.common.errors import ConfigError
from surf_train.models.blocks import EPS, ConditionEmbedder, RefinerBlock, rope_angles
from surf_train.models.windows import IMPLS, Size3

# What a preview can be (docs/method.md, "Preview kinds"): the target's latent area-pooled (super-resolution of an
# exact low-resolution latent), a degraded encoding of real video, or the base model's own low-resolution finish
# after noise reshifting (SURF's previews). A Refiner with `kind_condition` is told which one it refines.
PREVIEW_KINDS = ("exact", "degraded", "generated")


def kind_index(
    kind: str | Sequence[str] | torch.Tensor, batch: int, device: torch.device | None = None
) -> torch.Tensor:
    """A preview kind (a name for the whole batch, one name per sample, or (B,) indices) -> (B,) long indices."""
    if isinstance(kind, torch.Tensor):
        if kind.shape != (batch,) or kind.dtype != torch.long:
            raise ValueError(
                f"preview_kind must be (B,) = ({batch},) long indices, got {kind.dtype} {tuple(kind.shape)}"
            )
        if int(kind.min()) < 0 or int(kind.max()) >= len(PREVIEW_KINDS):
            raise ValueError(f"preview_kind indices must be in [0, {len(PREVIEW_KINDS)}), got {kind.tolist()}")
        return kind.to(device)
    names = [kind] * batch if isinstance(kind, str) else list(kind)
    bad = [k for k in names if k not in PREVIEW_KINDS]
    if bad or len(names) != batch:
        raise ValueError(f"preview_kind must be one of {PREVIEW_KINDS} (or {batch} of them), got {kind!r}")
    return torch.tensor([PREVIEW_KINDS.index(k) for k in names], dtype=torch.long, device=device)


def text_padding_mask(text: torch.Tensor) -> torch.Tensor:
    """(B, L) True for real tokens of (B, L, D) text embeddings: the shards, the readers' per-batch padding and the
    Wan pipeline's encode_prompt all pad with zero rows, so training and generation see the same tokens."""
    return text.abs().amax(-1) > 0


def trim_text(
    text: torch.Tensor | None, text_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Text (B, L, D) and its (B, L) keep-mask (None: the non-zero rows) cut after the last token any sample keeps;
    the mask None when nothing left is padding, both None when no token is kept. The same attention as masking
    the padding, and a prompt's cross-attention needs no mask at all (flash kernels take none)."""
    if text is None:
        return None, None
    mask = text_padding_mask(text) if text_mask is None else text_mask.bool()
    if torch.compiler.is_compiling() or text.is_meta:
        return text, mask  # a data-dependent length would break the graph (or a meta trace): mask the padding
    kept = mask.any(0)  # (L,)
    if not kept.any():
        return None, None  # as before: every sample's cross-attention output was zeroed
    n = int(kept.nonzero().max()) + 1
    text, mask = text[:, :n], mask[:, :n]
    return text, (None if mask.all() else mask)


def as_velocity(out: torch.Tensor | Transformer2DModelOutput | tuple[torch.Tensor]) -> torch.Tensor:
    """The velocity in a Refiner's output (return_dict either way) or a plain velocity function's tensor: the
    samplers and the objective take either as their network."""
    if isinstance(out, Transformer2DModelOutput):
        return out.sample
    return out[0] if isinstance(out, tuple) else out


def patch_grid(shape: tuple[int, ...], patch: Size3) -> Size3:
    """Token grid (F', H', W') of a (B, C, F, H, W) shape."""
    return tuple(s // p for s, p in zip(shape[2:], patch))


def unpatchify(x: torch.Tensor, grid: Size3, patch: Size3) -> torch.Tensor:
    """(B, N, pt*ph*pw*C) tokens -> (B, C, F, H, W), Wan's channel-last patch order."""
    b = x.shape[0]
    x = x.reshape(b, *grid, *patch, -1)  # (B, F', H', W', pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', pt, H', ph, W', pw)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Refiner(ModelMixin, AttentionMixin, ConfigMixin):
    """Shifted-window DiT: (x_t, t, cond, text) -> velocity, all latents (B, C, F, H, W).

    A diffusers model (save_pretrained / from_pretrained, set_attention_backend, compile_repeated_blocks, the
    attention processor API); forward returns Transformer2DModelOutput(sample=velocity), or (velocity,) with
    return_dict=False. The keyword arguments of `__init__` are the one list of its settings and their defaults
    (the `tiny` preset, text 32 wide); `RefinerConfig` is derived from them. `grad_checkpointing` is a training
    switch (enable_gradient_checkpointing), not part of the saved config.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["RefinerBlock"]
    _repeated_blocks = ["RefinerBlock"]  # compile_repeated_blocks: regional compilation, one graph for all blocks
    # layerwise casting (fp8 storage) leaves these in the compute dtype, as Wan's
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    # kept float32 by from_pretrained(torch_dtype=bf16): adaLN tables, norm weights, the timestep MLP (as Wan)
    _keep_in_fp32_modules = ["scale_shift_table", "norm_q", "norm_k", "norm2", "time_embedder", "kind_embedder"]
    ignore_for_config = ["grad_checkpointing"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,  # latent channels C (output has C too; input is 2C: x_t and cond)
        patch_size: Size3 = (1, 2, 2),  # (pt, ph, pw) latent pixels per token
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,  # ffn_dim = round(dim * mlp_ratio)
        window: Size3 = (2, 4, 4),  # (wt, wh, ww) in tokens; >= grid extent or <= 0: whole axis
        text_dim: int = 32,  # text encoder width; 0 = no text cross-attention
        freq_dim: int = 256,  # sinusoidal timestep features
        rope_theta: float = 10000.0,
        qk_norm: bool = True,
        grad_checkpointing: bool = False,
        attn_impl: Literal[IMPLS] = "auto",  # "mask" | "grouped" | "auto", see windows.window_attention
        ffn_conv: int = 0,  # k > 0: a k x k depthwise conv (per frame) in each FFN, across window cuts; 0: none
        kind_condition: bool = False,  # told the preview's kind (PREVIEW_KINDS): an embedding added to the time's
    ):
        super().__init__()
        # register_to_config has stored every argument but grad_checkpointing as self.config (config.json)
        self._cfg = cfg = RefinerConfig.from_dict({k: v for k, v in self.config.items() if not k.startswith("_")})
        c, d = cfg.in_channels, cfg.dim
        self.patch_embedding = nn.Conv3d(2 * c, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        kinds = len(PREVIEW_KINDS) if cfg.kind_condition else 0
        self.condition_embedder = ConditionEmbedder(cfg.freq_dim, d, cfg.text_dim, kinds)
        kw = {k: getattr(cfg, k) for k in ("window", "attn_impl", "qk_norm", "text_dim", "ffn_conv")}
        blocks = (RefinerBlock(d, cfg.heads, cfg.ffn_dim, shift=i % 2 == 1, **kw) for i in range(cfg.depth))
        self.blocks = nn.ModuleList(blocks)  # odd blocks attend in shifted windows
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
        return_dict: bool = True,
        preview_kind: str | Sequence[str] | torch.Tensor | None = None,  # PREVIEW_KINDS name(s) or (B,) indices
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """The velocity at (x_t, t) given the upsampled preview. `preview_kind` (a Refiner with `kind_condition`):
        what the preview is; None leaves the kind embedding out, as for a Refiner trained without it."""
        self._check(x_t, t, cond, text, text_mask)
        if preview_kind is not None:
            if not self._cfg.kind_condition:
                raise ValueError("preview_kind given but this Refiner has no kind condition (kind_condition=False)")
            preview_kind = kind_index(preview_kind, x_t.shape[0], x_t.device)
        text, text_mask = trim_text(text, text_mask)
        cfg = self._cfg
        grid = patch_grid(x_t.shape, cfg.patch_size)
        x = self.patch_embedding(torch.cat([x_t, cond], dim=1))  # (B, D, F', H', W')
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        temb, mod, text = self.condition_embedder(t, text, preview_kind)  # (B, D), (B, 6, D), (B, L, D)
        rope = rope_angles(grid, cfg.rope_dims, cfg.rope_theta, x.device)  # 2 x (N, head_dim/2)
        for blk in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(blk, x, mod, grid, rope, text, text_mask)
            else:
                x = blk(x, mod, grid, rope, text, text_mask)
        shift, scale = (self.scale_shift_table + temb[:, None]).unsqueeze(2).unbind(1)  # (B, 1, D)
        x = self.proj_out((self.norm_out(x) * (1 + scale) + shift).to(x.dtype))  # (B, N, pt*ph*pw*C)
        out = unpatchify(x, grid, cfg.patch_size)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    @classmethod
    def from_wan_transformer(cls, wan: Any, **overrides: Any) -> tuple[Refiner, WanInitReport]:
        """Refiner shaped like a diffusers WanTransformer3DModel (module or saved directory), initialised from it."""
        if isinstance(wan, (str, bytes)) or hasattr(wan, "__fspath__"):
            from diffusers import WanTransformer3DModel

            wan = WanTransformer3DModel.from_pretrained(wan)
        model = cls.from_cfg(config_from_wan(dict(wan.config), **overrides))
        return model, init_from_wan(model, wan.state_dict())


# --- config and presets ------------------------------------------------------------------------


class _RefinerConfigRules:
    """What RefinerConfig adds to its fields (Refiner.__init__'s): checks, derived sizes, the dict round trip."""

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.window = tuple(int(w) for w in self.window)
        for f in dataclasses.fields(self):
            choices = typing.get_args(f.type) if typing.get_origin(f.type) is Literal else ()
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} {getattr(self, f.name)!r} not in {choices}")
        self._check_sizes()

    def _check_sizes(self) -> None:
        for name in ("in_channels", "dim", "depth", "heads", "freq_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_dim < 0:
            raise ConfigError(f"text_dim must be >= 0 (0: no text cross-attention), got {self.text_dim}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size must be 3 positive ints, got {self.patch_size}")
        if len(self.window) != 3:
            raise ConfigError(f"window must be 3 ints (wt, wh, ww), got {self.window}")
        if self.dim % self.heads:
            raise ConfigError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"dim / heads = head_dim {self.head_dim} must be even and >= 6 for 3D RoPE")
        if self.ffn_conv < 0 or (self.ffn_conv and self.ffn_conv % 2 == 0):
            raise ConfigError(f"ffn_conv must be 0 (none) or an odd kernel size, got {self.ffn_conv}")

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
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of to_dict; unknown keys are an error."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown RefinerConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """A named preset (conf/model/<name>.yaml) with field overrides."""
        if name not in presets():
            raise ConfigError(f"unknown refiner preset {name!r}; choose from {sorted(presets())}")
        return cls.from_dict({**presets()[name], **overrides})


def _signature_fields(init: Any) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of each keyword argument of `init`, in order."""
    hints = typing.get_type_hints(init)
    return [(p.name, hints[p.name], p.default) for p in list(inspect.signature(init).parameters.values())[1:]]


RefinerConfig = dataclasses.make_dataclass(
    "RefinerConfig",
    _signature_fields(Refiner.__init__),
    bases=(_RefinerConfigRules,),
    namespace={"__module__": __name__, "__doc__": "Refiner.__init__'s settings as a dataclass; defaults: `tiny`."},
)


def refiner_config(model: Mapping[str, Any]) -> RefinerConfig:
    """The training config's `model` node {"preset": name, **fields} -> RefinerConfig.

    Hydra composed the node from conf/model/<name>.yaml, which names every field, so it is taken as it is; a
    partial one (tests; checkpoints saved before freq_dim and rope_theta were in the YAML) takes the fields it
    leaves out from its preset."""
    model = dict(model)
    name = model.pop("preset", "tiny")
    unset = [k for k in ("in_channels", "text_dim") if k in model and model[k] is None]
    if unset:
        raise ConfigError(
            f"model.{' and model.'.join(unset)} unset (null): `python -m surf_train` reads them from "
            f"the shards; elsewhere give them explicitly"
        )
    if {f.name for f in dataclasses.fields(RefinerConfig)} <= set(model):
        return RefinerConfig.from_dict(model)
    return RefinerConfig.preset(name, **model)


@functools.cache
def presets() -> dict[str, dict[str, Any]]:
    """The named Refiner presets as Hydra composes the `model` group (conf/model/<name>.yaml, their one home),
    less `preset` and the sizes left null there (read from the shards in training; Refiner's defaults elsewhere).
    Any Hydra already initialised (an app, a compose block) is set aside meanwhile and put back."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf import OmegaConf

    from surf_train import CONF_DIR

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            names = GlobalHydra.instance().config_loader().get_group_options("model")
            nodes = {n: OmegaConf.to_container(compose(overrides=[f"+model={n}"]).model) for n in names}
    finally:
        restore_gh_from_backup(backup)
    return {
        name: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "preset" and v is not None}
        for name, d in nodes.items()
    }


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
