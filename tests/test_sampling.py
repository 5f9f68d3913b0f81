import pytest
import torch

from surf_train.sampling import (RULES, PreviewPlan, count_calls, euler_sample, flow_sigmas, low_res_sigmas,
                                 noise_gain, pair_sample, preview_sample, reshift, resize_latent, shift_sigma)

HR, LR = (16, 16), (8, 8)


def oracle(x0_hr, down="area"):
    """Exact velocity for a known clean latent at whatever resolution x has: v = (x - x0) / s."""
    def v(x, s):
        x0 = x0_hr if x.shape[-2:] == x0_hr.shape[-2:] else resize_latent(x0_hr, tuple(x.shape[-2:]), down)
        return (x - x0) / s
    return v


def nonlinear(x, s):
    """A resolution-agnostic, non-trivial velocity: trajectories depend on every step."""
    return torch.tanh(x) * (0.5 + s) - 0.3 * x


def noises(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 3, *HR, generator=g), torch.randn(b, 4, 3, *LR, generator=g)


def test_flow_sigmas_and_shift():
    s = flow_sigmas(10, 3.0)
    assert s[0] == 1 and s[-1] == 0 and len(s) == 11 and bool((s[1:] < s[:-1]).all())
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert torch.allclose(shift_sigma(shift_sigma(s, 2.0), 0.25), shift_sigma(s, 0.5), atol=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_oracle_recovers_clean_latent(rule):
    x0 = torch.randn(2, 4, 3, *HR, generator=torch.Generator().manual_seed(1))
    noise, fresh = noises()
    plan = PreviewPlan(steps=12, switch=4, shift=3.0, preview_size=LR, rule=rule)
    preview, target = pair_sample(oracle(x0), noise, plan, fresh)
    assert torch.allclose(target, x0, atol=1e-5)
    assert torch.allclose(preview, resize_latent(x0, LR, "area"), atol=1e-5)
    assert torch.allclose(preview_sample(oracle(x0), noise, plan, fresh), preview, atol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_switch_at_zero_equals_direct_low_res_sampling(rule):
    noise, fresh = noises()
    plan = PreviewPlan(steps=8, switch=0, shift=3.0, preview_size=LR, rule=rule)
    got = preview_sample(nonlinear, noise, plan, fresh)
    g = noise_gain(HR, LR, "area")
    assert g == pytest.approx(0.5)
    # paper: fresh noise, same schedule; snr/pool: the schedule shifted for the resolution (shift a*g,
    # the usual resolution-dependent shift); pool starts from the downsampled noise itself, rescaled
    start = fresh if rule != "pool" else resize_latent(noise, LR, "area") / g
    sig = flow_sigmas(8, 3.0) if rule == "paper" else flow_sigmas(8, 3.0 * g)
    assert torch.allclose(got, euler_sample(nonlinear, start, sig), atol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_switch_at_end_equals_native_then_downsample(rule):
    noise, fresh = noises()
    plan = PreviewPlan(steps=8, switch=8, shift=3.0, preview_size=LR, rule=rule)
    native = euler_sample(nonlinear, noise, flow_sigmas(8, 3.0))
    preview, target = pair_sample(nonlinear, noise, plan, fresh)
    assert torch.allclose(target, native, atol=1e-6)
    assert torch.allclose(preview, resize_latent(native, LR, "area"), atol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_shared_prefix_equals_separate_runs_and_saves_calls(rule):
    noise, fresh = noises()
    plan = PreviewPlan(steps=10, switch=3, shift=5.0, preview_size=LR, rule=rule)
    calls = {"high": 0, "low": 0}

    def counting(x, s):
        calls["high" if x.shape[-2:] == HR else "low"] += 1
        return nonlinear(x, s)

    preview, target = pair_sample(counting, noise, plan, fresh)
    shared = dict(calls)
    calls.update(high=0, low=0)
    separate_target = euler_sample(counting, noise, plan.sigmas)
    separate_preview = preview_sample(counting, noise, plan, fresh)
    assert torch.allclose(target, separate_target, atol=1e-6)
    assert torch.allclose(preview, separate_preview, atol=1e-6)
    want = count_calls(plan)
    assert shared == {"high": want["shared_high"], "low": want["shared_low"]}
    assert calls == {"high": want["separate_high"], "low": want["separate_low"]}


@pytest.mark.parametrize("mode,size", [("area", (8, 8)), ("area", (4, 8)), ("bilinear", (8, 8)),
                                       ("bilinear", (6, 10)), ("bicubic", (8, 8))])
def test_noise_gain_matches_measured_std(mode, size):
    eps = torch.randn(1, 4, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    small = (64 * size[0] // 16, 64 * size[1] // 16)
    measured = resize_latent(eps, small, mode).std().item()
    assert noise_gain((64, 64), small, mode) == pytest.approx(measured, rel=0.03)


@pytest.mark.parametrize("s", [0.2, 0.5, 0.9])
def test_snr_level_matches_measured_noise(s):
    eps = torch.randn(1, 4, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    x0 = torch.zeros_like(eps)
    x = (1 - s) * x0 + s * eps
    r = reshift(x, (x - x0) / s, s, (32, 32), "snr", torch.zeros(1, 4, 8, 32, 32), "area")
    g = resize_latent(eps, (32, 32), "area").std().item()  # measured noise gain of the downsampling
    measured = s * g / ((1 - s) + s * g)  # level whose SNR equals that of the downsampled noisy latent
    assert r.sigma == pytest.approx(measured, rel=0.02)
    assert r.sigma < s
    paper = reshift(x, (x - x0) / s, s, (32, 32), "paper", torch.zeros(1, 4, 8, 32, 32), "area")
    assert paper.sigma == s


@pytest.mark.parametrize("mode", ["area", "bilinear"])
def test_pool_gives_flow_matching_form(mode):
    g0 = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(1, 4, 8, 64, 64, generator=g0), torch.randn(1, 4, 8, 64, 64, generator=g0)
    s = 0.6
    r = reshift((1 - s) * x0 + s * eps, None, s, (32, 32), "pool", down=mode)
    x0_lr = resize_latent(x0, (32, 32), mode)
    eps_lr = resize_latent(eps, (32, 32), mode) / r.gain  # unit-variance noise at low resolution
    assert torch.allclose(r.x, (1 - r.sigma) * x0_lr + r.sigma * eps_lr, atol=1e-5)
    assert eps_lr.std().item() == pytest.approx(1.0, rel=0.03)
    assert r.sigma == pytest.approx(s * r.gain / ((1 - s) + s * r.gain))


def test_low_res_schedule_starts_at_reshift_level():
    sig = flow_sigmas(10, 3.0)
    for rule in ("snr", "pool"):
        rest = low_res_sigmas(sig, 4, rule, 0.5)
        assert float(rest[0]) == pytest.approx(shift_sigma(float(sig[4]), 0.5)) and float(rest[-1]) == 0
        assert bool((rest[1:] < rest[:-1]).all())
    assert torch.equal(low_res_sigmas(sig, 4, "paper", 0.5), sig[4:])


def test_frame_count_never_changes():
    x = torch.randn(1, 4, 7, 16, 24)
    assert resize_latent(x, (8, 12), "bilinear").shape == (1, 4, 7, 8, 12)


def test_bad_plans_raise():
    with pytest.raises(ValueError, match="switch"):
        PreviewPlan(steps=4, switch=5, shift=1.0, preview_size=LR)
    with pytest.raises(ValueError, match="rule"):
        PreviewPlan(steps=4, switch=1, shift=1.0, preview_size=LR, rule="nope")
    with pytest.raises(ValueError, match="fresh noise"):
        reshift(torch.zeros(1, 4, 1, *HR), torch.zeros(1, 4, 1, *HR), 0.5, LR, "paper", None)
