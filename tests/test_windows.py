"""Shifted-window attention against references built from token coordinates."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from surf_train.models.windows import (
    clamp_window,
    shift_size,
    window_attention,
    window_attention_mask,
    window_merge,
    window_partition,
)

CASES = [((4, 8, 8), (2, 4, 4)), ((3, 5, 7), (2, 4, 4)), ((5, 6, 9), (2, 4, 4)), ((2, 6, 6), (8, 3, 6))]


def _qkv(grid, b=2, heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    return [torch.randn(b, n, heads, d, generator=g) for _ in range(3)]


def _coords(grid):
    return list(itertools.product(*(range(g) for g in grid)))  # row-major = token order


def _allowed(grid, window, shift):
    """(N, N) keep-mask from coordinates: same window id (x + w - s) // w on every axis."""
    window = clamp_window(grid, window)
    shifts = shift_size(grid, window) if shift else (0, 0, 0)
    ids = torch.tensor([[(x + w - s) // w for x, w, s in zip(c, window, shifts)] for c in _coords(grid)])
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


def _full(q, k, v, mask=None):
    """Plain SDPA over all tokens: (B, N, heads, d)."""
    o = F.scaled_dot_product_attention(*(y.transpose(1, 2) for y in (q, k, v)), attn_mask=mask)
    return o.transpose(1, 2)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("grid,window", CASES + [((3, 5, 7), (1, 1, 1))])
def test_partition_merge_identity(grid, window, shift):
    x = torch.randn(2, math.prod(grid), 3, 4)
    s = shift_size(grid, window) if shift else (0, 0, 0)
    windows, valid = window_partition(x, grid, window, s)
    w = clamp_window(grid, window)
    n_windows = math.prod(math.ceil(g / ww) for g, ww in zip(grid, w))
    assert windows.shape == (2, n_windows, math.prod(w), 3, 4)
    assert valid.shape == (n_windows, math.prod(w))
    assert int(valid.sum()) == math.prod(grid)  # every real token exactly once
    assert torch.equal(window_merge(windows, grid, window, s), x)


def test_partition_pads_with_zeros_and_flags_padding():
    grid, window = (3, 5, 7), (2, 4, 4)
    x = torch.randn(1, math.prod(grid), 6) + 10.0
    windows, valid = window_partition(x, grid, window)
    assert (windows[0][~valid] == 0).all() and (windows[0][valid] != 0).all()


def test_window_covering_grid_is_full_attention():
    grid = (3, 4, 5)
    q, k, v = _qkv(grid)
    ref = _full(q, k, v)
    for window in [grid, (8, 8, 8), (0, -1, 99)]:
        for shift in (False, True):
            for impl in ("mask", "grouped"):
                out = window_attention(q, k, v, grid, window, shift, impl)
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_no_mask_when_nothing_is_masked():
    assert window_attention_mask((4, 8, 8), (2, 4, 4), (0, 0, 0)) is None
    assert window_attention_mask((3, 8, 8), (2, 4, 4), (0, 0, 0)) is not None  # padding
    assert window_attention_mask((4, 8, 8), (2, 4, 4), (1, 2, 2)) is not None  # wrap


@pytest.mark.parametrize("impl", ["mask", "grouped"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("grid,window", CASES)
def test_matches_coordinate_mask_reference(grid, window, shift, impl):
    q, k, v = _qkv(grid)
    ref = _full(q, k, v, _allowed(grid, window, shift))
    out = window_attention(q, k, v, grid, window, shift, impl)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["mask", "grouped"])
def test_shifted_equals_roll_wrap_mask_roll_back(impl):
    """Literal Swin recipe on a divisible grid: roll by -w//2, window + wrap mask, roll back."""
    grid, window = (4, 8, 8), (2, 4, 4)
    s = [w // 2 for w in window]
    rolled = [torch.roll(y.reshape(2, *grid, 2, 8), [-x for x in s], (1, 2, 3)).reshape(y.shape) for y in _qkv(grid)]
    c = torch.tensor(_coords(grid))  # coordinates in the rolled grid
    w = torch.tensor(window)
    same_window = ((c[:, None] // w) == (c[None] // w)).all(-1)
    wrapped = c >= torch.tensor(grid) - torch.tensor(s)  # came around from the start of that axis
    same_side = (wrapped[:, None] == wrapped[None]).all(-1)
    o = _full(*rolled, same_window & same_side)
    ref = torch.roll(o.reshape(2, *grid, 2, 8), s, (1, 2, 3)).reshape(o.shape)
    out = window_attention(*_qkv(grid), grid, window, True, impl)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["mask", "grouped"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("grid,window,token", [((4, 8, 8), (2, 4, 4), (1, 3, 4)), ((3, 5, 7), (2, 4, 4), (2, 0, 6))])
def test_perturbing_one_token_changes_exactly_its_window(grid, window, token, shift, impl):
    q, k, v = _qkv(grid)
    j = _coords(grid).index(token)
    out = window_attention(q, k, v, grid, window, shift, impl)
    k2, v2 = k.clone(), v.clone()
    k2[:, j] += 1.0
    v2[:, j] += 1.0
    changed = (window_attention(q, k2, v2, grid, window, shift, impl) != out).any(-1).any(-1).any(0)  # (N,)
    # Expected set from coordinates only: windows are cut at s, s + w, ... on each axis.
    wins = clamp_window(grid, window)
    s = [w // 2 if (shift and w < g) else 0 for g, w in zip(grid, wins)]
    expected = torch.tensor(
        [all((x + w - ss) // w == (y + w - ss) // w for x, y, w, ss in zip(c, token, wins, s)) for c in _coords(grid)]
    )
    assert torch.equal(changed, expected)
    assert 1 < int(expected.sum()) < math.prod(grid)


def test_plain_and_shifted_windows_differ():
    grid, window = (4, 8, 8), (2, 4, 4)
    q, k, v = _qkv(grid)
    plain, shifted = (window_attention(q, k, v, grid, window, s) for s in (False, True))
    assert not torch.allclose(plain, shifted)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("grid,window", CASES + [((7, 9, 11), (3, 4, 5))])
def test_grouped_equals_mask(grid, window, shift):
    q, k, v = _qkv(grid, seed=1)
    a = window_attention(q, k, v, grid, window, shift, "mask")
    b = window_attention(q, k, v, grid, window, shift, "grouped")
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_grouped_gradients_match_mask():
    grid, window = (3, 5, 7), (2, 4, 4)
    grads = []
    for impl in ("mask", "grouped"):
        qkv = [y.requires_grad_() for y in _qkv(grid)]
        (window_attention(*qkv, grid, window, True, impl) ** 2).sum().backward()
        assert all(torch.isfinite(y.grad).all() for y in qkv)
        grads.append([y.grad for y in qkv])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    q, k, v = _qkv((2, 4, 4))
    with pytest.raises(ValueError, match="grid"):
        window_attention(q, k, v, (2, 4, 5), (2, 2, 2))
    with pytest.raises(ValueError, match="impl"):
        window_attention(q, k, v, (2, 4, 4), (2, 2, 2), impl="flash")
