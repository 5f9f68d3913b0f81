import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from surf_train.base.sampling import (
    RULES,
    PreviewPlan,
    Schedule,
    count_calls,
    euler_sample,
    flow_sigmas,
    low_res_sigmas,
    noise_gain,
    pair_sample,
    preview_sample,
    reshift,
    resize_latent,
    sample,
    scheduler_on,
    shift_sigma,
    with_shift,
)
from surf_train.common.errors import ConfigError

HR, LR = (16, 16), (8, 8)
FLOW = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
# (scheduler, custom_sigmas): WanPipeline calls set_timesteps(N), HunyuanVideoPipeline passes custom sigmas.
# UniPC as the Wan 2.1 diffusers repositories ship it (flow prediction, flow sigmas, solver order 2, bh2).
SCHEDULERS = {
    "euler": (lambda a: FlowMatchEulerDiscreteScheduler(shift=a), False),
    "unipc": (lambda a: UniPCMultistepScheduler(**FLOW, flow_shift=a), False),
    "dpm++": (lambda a: DPMSolverMultistepScheduler(**FLOW, flow_shift=a, algorithm_type="dpmsolver++"), False),
    "euler-sigmas": (lambda a: FlowMatchEulerDiscreteScheduler(shift=a), True),
    "unipc-sigmas": (lambda a: UniPCMultistepScheduler(**FLOW, flow_shift=a), True),
}


def schedule(name, steps, shift=3.0):
    make, custom = SCHEDULERS[name]
    return Schedule(make(shift), steps, custom)


def plan_for(name, steps, switch, rule, shift=3.0):
    return PreviewPlan(schedule(name, steps, shift), switch=switch, preview_size=LR, rule=rule)


def oracle(x0_hr, down="area"):
    """Exact velocity for a known clean latent at whatever resolution x has: v = (x - x0) / s."""

    def v(x, step):
        x0 = x0_hr if x.shape[-2:] == x0_hr.shape[-2:] else resize_latent(x0_hr, tuple(x.shape[-2:]), down)
        return (x - x0) / step.sigma

    return v


def nonlinear(x, step):
    """A resolution-agnostic, non-trivial velocity: trajectories depend on every step."""
    s = step if isinstance(step, float) else step.sigma
    return torch.tanh(x) * (0.5 + s) - 0.3 * x


def noises(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 3, *HR, generator=g), torch.randn(b, 4, 3, *LR, generator=g)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_flow_sigmas_and_shift():
    s = flow_sigmas(10, 3.0)
    assert s[0] == 1 and s[-1] == 0 and len(s) == 11 and bool((s[1:] < s[:-1]).all())
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert torch.allclose(shift_sigma(shift_sigma(s, 2.0), 0.25), shift_sigma(s, 0.5), atol=1e-12)


def test_flow_match_euler_is_euler_on_its_own_grid():
    """diffusers' grid is linspace(1, sigma_min) shifted, then 0: not ours, and the samples differ."""
    sch = schedule("euler", 10)
    noise, _ = noises()
    assert torch.allclose(sample(nonlinear, noise, sch), euler_sample(nonlinear, noise, sch.sigmas), atol=1e-6)
    assert not torch.allclose(sch.sigmas, flow_sigmas(10, 3.0), atol=1e-2)
    assert float(sch.sigmas[0]) == 1 and float(sch.sigmas[-1]) == 0 and len(sch.sigmas) == 11


def test_multistep_solvers_are_not_euler_and_runs_do_not_leak_state():
    noise, _ = noises()
    euler = sample(nonlinear, noise, schedule("euler", 8))
    for name in ("unipc", "dpm++"):
        sch = schedule(name, 8)
        a, b = sample(nonlinear, noise, sch), sample(nonlinear, noise, sch)
        assert torch.equal(a, b)  # a fresh scheduler per run: no history carried over
        assert sch.scheduler.step_index is None and sch.scheduler.num_inference_steps is None  # template unstepped
        assert rel(a, euler) > 1e-3


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_velocity_gets_the_pipelines_timesteps_and_steps(name):
    sch = schedule(name, 6)
    ref = sch.start()
    seen = []

    def v(x, step):
        seen.append(step)
        return nonlinear(x, step)

    noise, fresh = noises()
    sample(v, noise, sch)
    assert [s.index for s in seen] == list(range(6)) and [s.start for s in seen] == [True] + [False] * 5
    for s, t, sig in zip(seen, ref.timesteps, ref.sigmas):
        assert s.timestep.dtype == ref.timesteps.dtype and s.timestep == t and s.sigma == float(sig)
    seen.clear()
    pair_sample(v, noise, PreviewPlan(sch, switch=2, preview_size=LR, rule="pool"), fresh)
    # prefix 0, 1; the low-resolution run continues the numbering from the switch; then the target branch
    assert [(s.index, s.stage) for s in seen] == [
        (0, "native"),
        (1, "native"),
        *[(i, "low") for i in range(2, 6)],
        *[(i, "native") for i in range(2, 6)],
    ]
    assert [s.start for s in seen].count(True) == 1


@pytest.mark.parametrize("name", ["euler", "unipc", "dpm++"])
def test_scheduler_on_visits_exactly_the_levels(name):
    template = SCHEDULERS[name][0](5.0)
    levels = shift_sigma(schedule(name, 12, 5.0).sigmas[4:], 0.5)
    s = scheduler_on(template, levels)
    assert torch.allclose(s.sigmas.double(), levels, atol=1e-7) and len(s.timesteps) == len(levels) - 1
    assert type(s) is type(template) and s.config.get("solver_order") == template.config.get("solver_order")


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("rule", RULES)
def test_oracle_recovers_clean_latent(rule, name):
    x0 = torch.randn(2, 4, 3, *HR, generator=torch.Generator().manual_seed(1))
    noise, fresh = noises()
    plan = plan_for(name, 12, 4, rule)
    preview, target = pair_sample(oracle(x0), noise, plan, fresh)
    assert torch.allclose(target, x0, atol=1e-4)
    assert torch.allclose(preview, resize_latent(x0, LR, "area"), atol=1e-4)
    assert torch.allclose(preview_sample(oracle(x0), noise, plan, fresh), preview, atol=1e-5)


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("rule", RULES)
def test_switch_at_zero_equals_direct_low_res_sampling(rule, name):
    """Switch 0 is low-resolution sampling with the same scheduler class: `paper` from fresh noise on the same
    schedule; `snr`/`pool` on the schedule shifted for the resolution, shift(s, a) -> shift(s, a * g) (the usual
    resolution-dependent shift), `pool` from the downsampled noise itself, rescaled."""
    noise, fresh = noises()
    a, steps = 3.0, 8
    plan = plan_for(name, steps, 0, rule, a)
    got = preview_sample(nonlinear, noise, plan, fresh)
    g = noise_gain(HR, LR, "area")
    assert g == pytest.approx(0.5)
    start = fresh if rule != "pool" else resize_latent(noise, LR, "area") / g
    if rule == "paper":
        want = sample(nonlinear, start, plan.schedule)
    elif name == "euler":  # FlowMatchEuler's set_timesteps(N) grid depends on the shift beyond shift(., a): by hand
        want = euler_sample(nonlinear, start, shift_sigma(plan.sigmas, g))
    else:  # the scheduler itself, configured with shift a * g
        want = sample(
            nonlinear, start, Schedule(with_shift(plan.schedule.scheduler, a * g), steps, plan.schedule.custom_sigmas)
        )
    # a first level s0 < 1 (DPM-Solver++'s flow grid starts at shift(0.999, a)) keeps a (1 - s0) share of the clean
    # estimate at the switch, which direct sampling from noise has not
    s0 = float(plan.sigmas[0])
    tol = max(1e-5, 5 * (1 - s0))
    assert rel(got, want) < tol, rel(got, want)


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("rule", RULES)
def test_switch_at_end_equals_native_then_downsample(rule, name):
    noise, fresh = noises()
    plan = plan_for(name, 8, 8, rule)
    native = sample(nonlinear, noise, plan.schedule)
    preview, target = pair_sample(nonlinear, noise, plan, fresh)
    assert torch.equal(target, native)
    assert torch.allclose(preview, resize_latent(native, LR, "area"), atol=1e-6)


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("rule", RULES)
def test_shared_prefix_equals_separate_runs_and_saves_calls(rule, name):
    noise, fresh = noises()
    plan = plan_for(name, 10, 3, rule, 5.0)
    calls = {"high": 0, "low": 0}

    def counting(x, step):
        calls["high" if x.shape[-2:] == HR else "low"] += 1
        return nonlinear(x, step)

    preview, target = pair_sample(counting, noise, plan, fresh)
    shared = dict(calls)
    calls.update(high=0, low=0)
    separate_target = sample(counting, noise, plan.schedule)
    separate_preview = preview_sample(counting, noise, plan, fresh)
    assert torch.equal(target, separate_target)
    assert torch.equal(preview, separate_preview)
    want = count_calls(plan)
    assert shared == {"high": want["shared_high"], "low": want["shared_low"]}
    assert calls == {"high": want["separate_high"], "low": want["separate_low"]}


def test_low_res_run_is_a_fresh_solver():
    """After the switch a multistep solver restarts at order 1: its first low-resolution step equals an Euler step
    (DPM-Solver++ and UniPC's predictor are exact exponential integrators of order 1 there)."""
    noise, fresh = noises()
    for name in ("unipc", "dpm++"):
        plan = plan_for(name, 10, 4, "paper")
        seen = []

        def v(x, step):
            seen.append((x.clone(), step))
            return nonlinear(x, step)

        preview_sample(v, noise, plan, fresh)
        (x1, s1), (x2, s2) = [(x, s) for x, s in seen if s.stage == "low"][:2]
        x0 = x1 - s1.sigma * nonlinear(x1, s1)  # data prediction at the first low-resolution level
        # first-order data-prediction update: x_t = (s_t / s_s) x_s + (1 - s_t / s_s) x0 ... with alpha = 1 - s
        euler = (s2.sigma / s1.sigma) * x1 + ((1 - s2.sigma) - (1 - s1.sigma) * s2.sigma / s1.sigma) * x0
        assert torch.allclose(x2, euler, atol=1e-5)


@pytest.mark.parametrize(
    "mode,size", [("area", (8, 8)), ("area", (4, 8)), ("bilinear", (8, 8)), ("bilinear", (6, 10)), ("bicubic", (8, 8))]
)
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
    sig = schedule("unipc", 10).sigmas
    for rule in ("snr", "pool"):
        rest = low_res_sigmas(sig, 4, rule, 0.5)
        assert float(rest[0]) == pytest.approx(shift_sigma(float(sig[4]), 0.5)) and float(rest[-1]) == 0
        assert bool((rest[1:] < rest[:-1]).all())
    assert torch.equal(low_res_sigmas(sig, 4, "paper", 0.5), sig[4:])


def test_frame_count_never_changes():
    x = torch.randn(1, 4, 7, 16, 24)
    assert resize_latent(x, (8, 12), "bilinear").shape == (1, 4, 7, 8, 12)


def test_bad_plans_and_schedulers_raise():
    with pytest.raises(ConfigError, match="switch"):
        plan_for("euler", 4, 5, "pool")
    with pytest.raises(ConfigError, match="rule"):
        plan_for("euler", 4, 1, "nope")
    with pytest.raises(ValueError, match="fresh noise"):
        reshift(torch.zeros(1, 4, 1, *HR), torch.zeros(1, 4, 1, *HR), 0.5, LR, "paper", None)
    with pytest.raises(ConfigError, match="DDIMScheduler is not supported"):
        Schedule(DDIMScheduler(), 4)
    with pytest.raises(ConfigError, match="use_flow_sigmas=True"):
        Schedule(UniPCMultistepScheduler(), 4)
    with pytest.raises(ConfigError, match="takes no custom sigmas"):
        Schedule(DPMSolverMultistepScheduler(**FLOW), 4, custom_sigmas=True)
    with pytest.raises(ConfigError, match="steps=0"):
        Schedule(FlowMatchEulerDiscreteScheduler(), 0)
