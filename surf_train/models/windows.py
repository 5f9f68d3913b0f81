"""Shifted-window self-attention on a (F', H', W') token grid as pure functions
(docs/method.md#shifted-window-attention).

Tokens are flat in row-major grid order: x is (B, N, *rest) with N = F' * H' * W' and token
(f, h, w) at index (f * H' + h) * W' + w, the order of `conv3d(...).flatten(2)`. q, k, v are
(B, N, heads, head_dim).

A window size >= the grid extent (or <= 0) means no windowing on that axis. Grids the window does
not divide are padded at the end; padding tokens are never attended to. Shifted windows roll the
padded grid by -w//2 on each windowed axis and mask attention across the wrap (Swin). In original
coordinates that is the partition with cuts at s, s + w, s + 2w, ... (s = w//2), clipped to the grid:
token x along an axis lies in window (x + w - s) // w. The "grouped" implementation computes exactly
that partition with no mask: one SDPA call per window size.

The attention itself is a callable `attend(query, key, value, attn_mask=None)` on (B', S, heads, head_dim), the
layout of diffusers' `attention_dispatch.dispatch_attention_fn`, so the Refiner's processors hand in diffusers'
backend dispatch (flash, sage, flex, ...); `sdpa`, torch's SDPA, is the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Size3 = tuple[int, int, int]
Impl = Literal["mask", "grouped", "auto"]
IMPLS = ("mask", "grouped", "auto")
# attend(query, key, value, attn_mask=None): (B', S, heads, d) x 3 -> (B', S, heads, d)
AttendFn = Callable[..., torch.Tensor]


def clamp_window(grid: Size3, window: Size3) -> Size3:
    """Window clamped to the grid; a size <= 0 or >= the extent means the whole axis."""
    return tuple(g if (w <= 0 or w >= g) else w for g, w in zip(grid, window))  # type: ignore[return-value]


def shift_size(grid: Size3, window: Size3) -> Size3:
    """Half-window shift on each windowed axis, 0 on axes the window covers whole."""
    window = clamp_window(grid, window)
    return tuple(w // 2 if w < g else 0 for g, w in zip(grid, window))  # type: ignore[return-value]


def _padded(grid: Size3, window: Size3) -> Size3:
    return tuple(math.ceil(g / w) * w for g, w in zip(grid, window))  # type: ignore[return-value]


def _partition_grid(x: torch.Tensor, window: Size3) -> torch.Tensor:
    """(B, T, H, W, *rest) with window-divisible T, H, W -> (B, nW, wt*wh*ww, *rest)."""
    b, t, h, w = x.shape[:4]
    rest = x.shape[4:]
    wt, wh, ww = window
    x = x.reshape(b, t // wt, wt, h // wh, wh, w // ww, ww, -1)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, nt, nh, nw, wt, wh, ww, R)
    return x.reshape(b, -1, wt * wh * ww, *rest)


def _merge_grid(windows: torch.Tensor, grid: Size3, window: Size3) -> torch.Tensor:
    """Inverse of _partition_grid: (B, nW, wt*wh*ww, *rest) -> (B, T, H, W, *rest)."""
    b = windows.shape[0]
    rest = windows.shape[3:]
    (t, h, w), (wt, wh, ww) = grid, window
    x = windows.reshape(b, t // wt, h // wh, w // ww, wt, wh, ww, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, nt, wt, nh, wh, nw, ww, R)
    return x.reshape(b, t, h, w, *rest)


def window_partition(
    x: torch.Tensor, grid: Size3, window: Size3, shift: Size3 = (0, 0, 0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad, roll by -shift and cut (B, N, *rest) into windows.

    Returns windows (B, nW, Lw, *rest) with Lw = wt * wh * ww, and valid (nW, Lw) bool, False where
    the slot holds padding.
    """
    window = clamp_window(grid, window)
    b, n = x.shape[:2]
    if n != math.prod(grid):
        raise ValueError(f"{n} tokens do not fill grid {tuple(grid)}")
    rest = x.shape[2:]
    padded = _padded(grid, window)
    xg = x.reshape(b, *grid, -1)  # (B, T, H, W, R)
    pad = [0, 0]
    for g, p in zip(reversed(grid), reversed(padded)):
        pad += [0, p - g]
    xg = F.pad(xg, pad)
    ones = F.pad(torch.ones(1, *grid, 1, dtype=torch.bool, device=x.device), pad)
    if any(shift):
        dims = (1, 2, 3)
        xg = torch.roll(xg, [-s for s in shift], dims)
        ones = torch.roll(ones, [-s for s in shift], dims)
    windows = _partition_grid(xg, window).reshape(b, -1, math.prod(window), *rest)
    valid = _partition_grid(ones, window)[0, :, :, 0]  # (nW, Lw)
    return windows, valid


def window_merge(windows: torch.Tensor, grid: Size3, window: Size3, shift: Size3 = (0, 0, 0)) -> torch.Tensor:
    """Inverse of window_partition: (B, nW, Lw, *rest) -> (B, N, *rest), padding dropped."""
    window = clamp_window(grid, window)
    b = windows.shape[0]
    rest = windows.shape[3:]
    padded = _padded(grid, window)
    xg = _merge_grid(windows.reshape(*windows.shape[:3], -1), padded, window)  # (B, T, H, W, R)
    if any(shift):
        xg = torch.roll(xg, list(shift), (1, 2, 3))
    t, h, w = grid
    return xg[:, :t, :h, :w].reshape(b, t * h * w, *rest)


def _wrap_labels(grid: Size3, window: Size3, shift: Size3, device) -> torch.Tensor:
    """Swin region label of every slot of the padded, rolled grid: (T, H, W) int."""
    labels = []
    for g, w, s in zip(_padded(grid, window), window, shift):
        lab = torch.zeros(g, dtype=torch.long, device=device)
        if s:
            lab[g - w : g - s] = 1  # last window, part that was not wrapped
            lab[g - s :] = 2  # last window, part that came around from the start
        labels.append(lab)
    lt, lh, lw = labels
    return lt[:, None, None] * 9 + lh[None, :, None] * 3 + lw[None, None, :]


def window_attention_mask(grid: Size3, window: Size3, shift: Size3, device=None) -> torch.Tensor | None:
    """Boolean keep-mask (nW, Lw, Lw) for window_partition's windows, or None when nothing is masked."""
    window = clamp_window(grid, window)
    padded = _padded(grid, window)
    if not any(shift) and tuple(padded) == tuple(grid):
        return None
    _, valid = window_partition(torch.zeros(1, math.prod(grid), device=device), grid, window, shift)
    labels = _partition_grid(_wrap_labels(grid, window, shift, device)[None, ..., None], window)[0, :, :, 0]
    keep = (labels[:, :, None] == labels[:, None, :]) & valid[:, None, :]  # (nW, Lw, Lw)
    # Padding queries keep themselves so that no softmax row is empty (NaN on some SDPA backends);
    # their outputs are dropped by window_merge.
    return keep | torch.eye(keep.shape[-1], dtype=torch.bool, device=device)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """torch's SDPA on (B, S, heads, d), as diffusers' "native" attention backend computes it."""
    q, k, v = (y.transpose(1, 2) for y in (query, key, value))  # (B, heads, S, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)


def _sdpa_windows(q, k, v, mask: torch.Tensor | None, attend: AttendFn) -> torch.Tensor:
    """Attention inside windows: q, k, v (B, nW, Lw, heads, d), mask (nW, Lw, Lw) | None -> (B, nW, Lw, heads, d);
    one `attend` call with the windows as its batch."""
    b, nw, lw, h, d = q.shape
    q, k, v = (y.reshape(b * nw, lw, h, d) for y in (q, k, v))  # (B*nW, Lw, heads, d)
    if mask is not None:
        mask = mask[None, :, None].expand(b, -1, -1, -1, -1).reshape(b * nw, 1, lw, lw)
    return attend(q, k, v, attn_mask=mask).reshape(b, nw, lw, h, d)


def runs(g: int, w: int, s: int) -> list[tuple[int, int, int]]:
    """Cut one axis at s, s + w, s + 2w, ...; return runs of equal-size pieces as (start, stop, size)."""
    cuts = sorted({0, g} | {c for c in range(s, g, w) if 0 < c < g})
    out: list[tuple[int, int, int]] = []
    for a, z in zip(cuts[:-1], cuts[1:]):
        if out and out[-1][2] == z - a and out[-1][1] == a:
            out[-1] = (out[-1][0], z, z - a)
        else:
            out.append((a, z, z - a))
    return out


def _grouped_attention(q, k, v, grid: Size3, window: Size3, shift: Size3, attend: AttendFn) -> torch.Tensor:
    """Mask-free shifted-window attention: boxes of equal-size windows, one SDPA call per window size."""
    b, _, h, d = q.shape
    qg, kg, vg = (y.reshape(b, *grid, h, d) for y in (q, k, v))
    axes = [runs(g, w, s) for g, w, s in zip(grid, window, shift)]
    boxes = [(rt, rh, rw) for rt in axes[0] for rh in axes[1] for rw in axes[2]]
    groups: dict[Size3, list[int]] = {}
    parts = []  # per box: (q, k, v) windows (B, nW, Lw, heads, d)
    for i, box in enumerate(boxes):
        sl = (slice(None),) + tuple(slice(a, z) for a, z, _ in box)
        win = tuple(size for _, _, size in box)
        parts.append(tuple(_partition_grid(y[sl], win) for y in (qg, kg, vg)))
        groups.setdefault(win, []).append(i)  # type: ignore[arg-type]
    outs: list[torch.Tensor | None] = [None] * len(boxes)
    for idx in groups.values():
        counts = [parts[i][0].shape[1] for i in idx]
        qkv = [torch.cat([parts[i][j] for i in idx], dim=1) for j in range(3)]
        for i, o in zip(idx, _sdpa_windows(*qkv, None, attend).split(counts, dim=1)):
            box = boxes[i]
            outs[i] = _merge_grid(o, tuple(z - a for a, z, _ in box), tuple(size for _, _, size in box))
    # Reassemble boxes (B, bt, bh, bw, heads, d) into the grid: innermost axis W first.
    nt, nh, nw = (len(a) for a in axes)
    out = torch.cat(
        [
            torch.cat(
                [torch.cat(outs[(it * nh + ih) * nw : (it * nh + ih + 1) * nw], dim=3) for ih in range(nh)], dim=2
            )
            for it in range(nt)
        ],
        dim=1,
    )
    return out.reshape(b, -1, h, d)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Size3,
    window: Size3,
    shift: bool = False,
    impl: Impl = "auto",
    attend: AttendFn = sdpa,
) -> torch.Tensor:
    """Windowed self-attention of (B, N, heads, d) tokens on `grid`; shifted windows if `shift`.

    impl "mask" is the roll-and-mask reference, "grouped" the mask-free equivalent (FlashAttention-
    friendly: no mask, one `attend` call per window size), "auto" picks "grouped".
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown window attention impl {impl!r}; choose from {IMPLS}")
    if q.shape[1] != math.prod(grid):
        raise ValueError(f"q has {q.shape[1]} tokens, grid {tuple(grid)} has {math.prod(grid)}")
    window = clamp_window(grid, window)
    shifts = shift_size(grid, window) if shift else (0, 0, 0)
    if impl in ("grouped", "auto"):
        return _grouped_attention(q, k, v, grid, window, shifts, attend)
    mask = window_attention_mask(grid, window, shifts, q.device)
    qw, kw, vw = (window_partition(y, grid, window, shifts)[0] for y in (q, k, v))
    return window_merge(_sdpa_windows(qw, kw, vw, mask, attend), grid, window, shifts)
