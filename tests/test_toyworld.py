"""The toy world (captions, renderer, exact detector) and its pixel-shuffle latent."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from surf_train.base.toy_vae import PixelShuffleVAE
from surf_train.data.toyworld import (
    BACKGROUNDS,
    EXTENT,
    OBJECT_COLOURS,
    RADIUS,
    SHAPES,
    TRAVEL,
    Caption,
    all_captions,
    detect,
    motion,
    render,
    render_batch,
    truth,
)

CAPS = all_captions()


def test_grammar():
    assert len(CAPS) == len(set(CAPS)) == 4 * 3 * 2 * 3
    cap = Caption.parse("a red circle moving right on a gray background")
    assert (cap.colour, cap.shape, cap.direction, cap.background) == ("red", "circle", "right", "gray")
    assert all(str(Caption.parse(c)) == c for c in CAPS)
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        Caption.parse("a purple circle moving right on a gray background")
    with pytest.raises(ValueError, match="unknown direction 'left'"):  # captions move right or down only
        Caption.parse("a red circle moving left on a gray background")
    with pytest.raises(ValueError, match="not a toy-world caption"):
        Caption.parse("a cat playing piano")


def test_render_is_deterministic_and_moves():
    a = render(CAPS[0], 3)
    assert a.shape == (3, 9, 32, 32) and a.dtype == torch.float32 and -1 <= a.min() and a.max() <= 1
    assert torch.equal(a, render(CAPS[0], 3))
    assert not torch.equal(a, render(CAPS[0], 4))  # the seed moves and sizes the object
    assert not torch.equal(a, render(CAPS[1], 3))
    assert not torch.equal(a[:, 0], a[:, -1])


def test_lower_resolutions_are_exact_area_downsamples():
    x32 = render_batch(CAPS[:12], list(range(12)), (32, 32), 5)
    x16 = render_batch(CAPS[:12], list(range(12)), (16, 16), 5)
    assert torch.allclose(F.avg_pool3d(x32, (1, 2, 2)), x16, atol=1e-6)


def test_object_stays_inside_the_frame():
    """No shape is ever clipped: its extent around the centre (a bar's or pillar's long side) stays in [0, 1]."""
    for seed in range(3):
        for cap in CAPS:
            c = Caption.parse(cap)
            mo = motion(c, seed)
            centres = mo.centres(c, 5)
            reach = mo.radius * np.array(EXTENT[c.shape])  # (x, y)
            assert (centres - reach >= 0).all() and (centres + reach <= 1).all(), (cap, seed)
            assert all(lo <= v <= hi for v, (lo, hi) in ((mo.radius, RADIUS), (mo.travel, TRAVEL)))


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (24, 40)])
def test_detector_reads_ground_truth(size):
    """Colour, shape, background and direction exact; centres within 1.2% of the frame; speed within 2%."""
    for i, cap in enumerate(CAPS):
        d = detect(render(cap, 100 + i, size, 5))
        assert all(d.matches(cap).values()), (cap, d)
        centres, vel = truth(cap, 100 + i, 5)
        assert np.abs(d.centres - centres).max() < 0.012
        assert abs(d.speed - np.hypot(*vel)) < 0.02


def test_detector_sees_position_shape_and_absence():
    cap = "a blue bar moving right on a white background"
    a = render(cap, 3, (32, 32), 5)
    b_shifted = torch.roll(a, shifts=3, dims=-1)  # 3 pixels to the right (seed 3: still inside the frame)
    da, db = detect(a), detect(b_shifted)
    assert np.allclose(db.centres[:, 0] - da.centres[:, 0], 3 / 32, atol=1e-3)
    assert np.allclose(db.centres[:, 1], da.centres[:, 1], atol=1e-3)
    # the detector reads all four directions, though captions only move right or down: play clips backwards
    assert detect(a.flip(1)).direction == "left"
    assert detect(render("a red circle moving down on a black background", 3, (32, 32), 5).flip(1)).direction == "up"
    empty = torch.full((3, 5, 32, 32), 0.9)  # all white
    d = detect(empty)
    assert not d.found and d.colour is None and d.direction is None and d.background == "white"
    # a still object has no direction
    still = a[:, :1].repeat(1, 5, 1, 1)
    assert detect(still).direction is None and detect(still).shape == "bar"
    with pytest.raises(ValueError, match=r"\(3, F, H, W\)"):
        detect(torch.zeros(5, 32, 32))


def test_palette_is_separable():
    """No object colour is within reach of a background or of another object colour."""
    cols = np.array([*OBJECT_COLOURS.values(), *BACKGROUNDS.values()])
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(len(cols)) * 9
    assert d.min() > 0.4 and len(SHAPES) == 3


def test_pixel_shuffle_vae_is_exact_and_round_trips(tmp_path):
    vae = PixelShuffleVAE(stride=2, latents_mean=[0.1] * 12, latents_std=[0.5] * 12)
    x = render_batch(CAPS[:2], [0, 1], (32, 32), 5)
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 12, 5, 16, 16)
    assert torch.equal(vae.decode(z, return_dict=False)[0], x)
    assert torch.equal(
        z[:, :, :, 3, 4], x[:, :, :, 6:8, 8:10].reshape(2, 3, 5, 4).permute(0, 1, 3, 2).reshape(2, 12, 5)
    )  # channel = colour * 4 + sub-pixel (row-major)
    vae.save_pretrained(tmp_path)
    back = PixelShuffleVAE.from_pretrained(tmp_path)
    assert back.config.latents_mean == [0.1] * 12 and back.config.scale_factor_spatial == 2
    assert back.config.z_dim == 12 and back.config.scale_factor_temporal == 1
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 5, 31, 32))
