"""The Refiner's sampler (surf_train.models.sampler): consistency with the preview, detail start noise, and the
settings of an export read into one RefinerSampler; the training objective's start point."""

import pytest
import torch

from surf_train.base.sampling import resize_latent
from surf_train.common.errors import ConfigError
from surf_train.models.refiner import PREVIEW_KINDS
from surf_train.models.sampler import RefinerSampler, match_preview, start_noise, upsample
from surf_train.training.objective import BridgeConfig, bridge_batch, bridge_loss


def test_match_preview_is_the_orthogonal_projection_onto_the_preview():
    g = torch.Generator().manual_seed(0)
    x, preview = torch.randn(2, 4, 3, 8, 12, generator=g), torch.randn(2, 4, 3, 4, 6, generator=g)
    p = match_preview(x, preview)
    torch.testing.assert_close(resize_latent(p, (4, 6), "area"), preview)  # its area pooling is the preview
    torch.testing.assert_close(match_preview(p, preview), p)  # a projection: idempotent
    # orthogonal: x - p is perpendicular to every move that keeps the pooling, so p is the nearest such latent
    z = match_preview(torch.randn(x.shape, generator=g), preview)
    assert abs(float(((x - p) * (z - p)).sum())) < 1e-3 * float((x - p).norm() * (z - p).norm())
    assert (x - p).norm() < (x - z).norm()
    # the preview's own detail-free latent stays: nearest upsampling of the preview is already consistent
    flat = upsample(preview, (8, 12), "nearest")
    torch.testing.assert_close(match_preview(flat, preview), flat)


def test_match_preview_refuses_a_non_integer_factor():
    with pytest.raises(ConfigError, match="9x12 is not an integer multiple of the preview's 4x6"):
        match_preview(torch.zeros(1, 4, 1, 9, 12), torch.zeros(1, 4, 1, 4, 6))


def test_refine_with_preview_projects_its_output():
    """A zero-velocity Refiner returns its start point; with consistency that point takes the preview's low band."""
    preview = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x_up = upsample(preview, (8, 8))  # bilinear: its own pooling is not the preview
    zero = lambda x, t, c, txt: torch.zeros_like(x)  # noqa: E731
    assert torch.equal(RefinerSampler(steps=3).refine(zero, x_up), x_up)
    assert torch.equal(RefinerSampler(steps=3).refine(zero, x_up, preview), x_up)  # the preview alone changes nothing
    out = RefinerSampler(steps=3, consistency=True).refine(zero, x_up, preview)
    assert not torch.allclose(out, x_up)
    torch.testing.assert_close(out, match_preview(x_up, preview))
    torch.testing.assert_close(resize_latent(out, (4, 4), "area"), preview)


def test_consistent_sampler_keeps_every_target_estimate_on_the_preview():
    """An oracle that always estimates the target z: plain Euler returns z, the consistent sampler its projection
    (every step's estimate is projected, so the last one is); a consistent z comes back unchanged."""
    g = torch.Generator().manual_seed(3)
    preview, z = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    x_up = upsample(preview, (8, 8))

    def oracle(target):
        return lambda x, t, c, txt: (x - target) / t.view(-1, 1, 1, 1, 1)  # x - t v = target at every step

    for k in (1, 3):
        noisy = RefinerSampler(steps=k, start_noise=0.5)
        torch.testing.assert_close(noisy.refine(oracle(z), x_up, generator=g), z)
        out = noisy.override(consistency=True).refine(oracle(z), x_up, preview, generator=g)
        torch.testing.assert_close(out, match_preview(z, preview))
        zc = match_preview(z, preview)
        torch.testing.assert_close(RefinerSampler(k, consistency=True).refine(oracle(zc), x_up, preview), zc)


def test_detail_noise_has_nothing_on_the_preview_grid():
    g = torch.Generator().manual_seed(2)
    eps = start_noise((2, 4, 3, 8, 8), (4, 4), "detail", g)
    assert float(resize_latent(eps, (4, 4), "area").abs().max()) < 1e-6
    assert 0.8 < float(eps.std()) < 0.92  # 3/4 of unit variance is left (sqrt: 0.866)
    full = start_noise((2, 4, 3, 8, 8), (4, 4), "full", torch.Generator().manual_seed(2))
    torch.testing.assert_close(eps, match_preview(full, torch.zeros(2, 4, 3, 4, 4)))  # same draw, projected
    # training: the bridge's start point pools to the upsampled preview's pooling, whatever the noise level
    preview, target = torch.randn(4, 4, 3, 4, 4, generator=g), torch.randn(4, 4, 3, 8, 8, generator=g)
    bb = bridge_batch(preview, target, BridgeConfig(sigma_aug_max=1.0, noise_space="detail"), g)
    x_start = bb.v + target
    torch.testing.assert_close(resize_latent(x_start, (4, 4), "area"), resize_latent(bb.cond, (4, 4), "area"))
    # sampling: a zero-velocity Refiner returns the noisy start, which still pools to the same
    zero = lambda x, t, c, txt: torch.zeros_like(x)  # noqa: E731
    x_up = upsample(preview, (8, 8))
    detail = RefinerSampler(steps=2, start_noise=0.7, noise_space="detail")
    out = detail.refine(zero, x_up, preview, generator=g)
    assert float((out - x_up).std()) > 0.5
    torch.testing.assert_close(resize_latent(out, (4, 4), "area"), resize_latent(x_up, (4, 4), "area"))
    with pytest.raises(ConfigError, match="need the preview"):
        detail.refine(zero, x_up)


def test_sampler_reads_the_export_and_takes_overrides():
    old = RefinerSampler.from_bridge({})  # an export from before these settings: K 10, clean start, no projection
    assert old == RefinerSampler(steps=10, up_mode="bilinear", start_noise=0.0, noise_space="full", consistency=False)
    bridge = {"sigma_aug_eval": 0.3, "consistency": True, "noise_space": "detail", "steps": 4, "t_dist": "uniform"}
    s = RefinerSampler.from_bridge(bridge)
    assert (s.steps, s.start_noise, s.noise_space, s.consistency) == (4, 0.3, "detail", True)
    assert s.override(start_noise=0.0, consistency=None, steps=None) == RefinerSampler(
        4, "bilinear", 0.0, "detail", True
    )
    assert RefinerSampler.from_bridge(s.bridge_record()) == s  # what an export stores reads back the same
    assert BridgeConfig(steps=4, sigma_aug_eval=0.3, noise_space="detail", consistency=True).sampler() == s
    for bad in ({"steps": 0}, {"up_mode": "cubic"}, {"noise_space": "half"}, {"start_noise": -1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad)).replace("_", ".")):
            RefinerSampler(**bad)


def test_sampler_call_is_upsample_then_refine():
    preview = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    net = lambda x, t, c, txt: 0.1 * (x - c) + t.view(-1, 1, 1, 1, 1)  # noqa: E731
    s = RefinerSampler(steps=3, up_mode="bicubic", start_noise=0.2, noise_space="detail", consistency=True)
    x_up = upsample(preview, (8, 8), "bicubic")
    want = s.refine(net, x_up, preview, generator=torch.Generator().manual_seed(9))
    assert torch.equal(s(net, preview, (8, 8), generator=torch.Generator().manual_seed(9)), want)


def test_exact_low_weight_weighs_only_the_exact_previews_low_band():
    """bridge.exact_low_weight adds w x the mean square of each exact preview's velocity error pooled to the preview
    grid: an error with no low band adds nothing, a constant error c adds w c^2 per exact sample, and previews of
    the other kinds, or no kinds at all, add nothing."""
    g = torch.Generator().manual_seed(3)
    preview, target = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    detail = start_noise((2, 4, 3, 8, 8), (4, 4), "detail", g)  # pools to 0

    def net_off_by(err):  # the bridge velocity (x_t - target) / t, off by `err`
        return lambda x, t, c, txt: (x - target) / t.view(-1, 1, 1, 1, 1) + err

    cfg = BridgeConfig(exact_low_weight=3.0)
    exact_gen = torch.tensor([PREVIEW_KINDS.index("exact"), PREVIEW_KINDS.index("generated")])
    plain = bridge_loss(net_off_by(detail), preview, target, BridgeConfig(), generator=torch.Generator())
    torch.testing.assert_close(plain, detail.square().mean())
    torch.testing.assert_close(bridge_loss(net_off_by(detail), preview, target, cfg, kind=exact_gen), plain)
    c = 0.5
    const = torch.full_like(target, c)
    for kind, want in (
        (exact_gen, c**2 + 3.0 * c**2 / 2),
        (exact_gen.flip(0), c**2 + 3.0 * c**2 / 2),
        (torch.tensor([2, 2]), c**2),
        (None, c**2),
    ):
        torch.testing.assert_close(bridge_loss(net_off_by(const), preview, target, cfg, kind=kind), torch.tensor(want))
    with pytest.raises(ConfigError, match="bridge.exact_low_weight=-1"):
        BridgeConfig(exact_low_weight=-1.0)
