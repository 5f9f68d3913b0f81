"""Acceleration plug-ins on the base model: the work they skip is measured, and counted in FLOPs exactly."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from surf_train.base import Acceleration, BaseSpec, load_base_model
from surf_train.base.sampling import PreviewPlan, pair_sample, sample
from surf_train.common.errors import ConfigError
from surf_train.cost import metered_flops

PROMPT = "a red ball rolling across a wooden floor"


def latent(model, hw, seed=0, b=1):
    c, f, h, w = model.geometry.latent_shape(model.spec.native_frames, *model.spec.native_size)
    return torch.randn((b, c, f, *hw), generator=torch.Generator().manual_seed(seed))


def metered(model):
    m, f = model.meter, (model.spec.native_frames - 1) // model.spec.stride_t + 1
    lat = {hw: (model.spec.channels, f, *hw) for hw in m.forwards}
    return sum(
        metered_flops(
            model.spec.family, model.pipe.transformer.config, lat, m.forwards, m.blocks, model.spec.max_sequence_length
        ).values()
    )


@pytest.mark.parametrize("base", ["tiny", "tiny_hunyuan"])
def test_metered_flops_equal_the_flop_counter_with_a_cache(base):
    """With FirstBlockCache skipping blocks in a shared-prefix pair (two resolutions, batch of 2), the FLOPs from
    the Meter equal what torch's FlopCounterMode counts on the calls actually run."""
    model = load_base_model(BaseSpec.from_name(base), "cpu")
    cond = model.encode_prompt([PROMPT, "waves at sunset"])
    hw = tuple(s // model.spec.stride_s for s in model.spec.native_size)
    plan = PreviewPlan(model.schedule(10), switch=3, preview_size=(hw[0] // 2, hw[1] // 2), rule="pool")
    model.enable_cache(0.3)
    model.meter.reset()
    # on CPU the fused SDPA kernel is not in the counter's registry: the MATH backend (as tests/test_flops.py)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pair_sample(model.velocity_fn(cond), latent(model, hw, b=2), plan)
    model.disable_cache()
    assert 0.2 < model.meter.block_fraction(None, model.block_lists) < 0.95  # it skipped, not everything
    assert metered(model) == counter.get_total_flops()


def test_no_cache_runs_every_block_and_a_tiny_threshold_changes_nothing(tiny_wan):
    cond = tiny_wan.encode_prompt([PROMPT])
    noise = latent(tiny_wan, (8, 8))
    tiny_wan.meter.reset()
    plain = sample(tiny_wan.velocity_fn(cond), noise, tiny_wan.schedule(6))
    assert tiny_wan.meter.block_fraction(None, tiny_wan.block_lists) == 1.0
    assert tiny_wan.meter.forwards[(8, 8)] == 12  # CFG: two forwards a step
    tiny_wan.enable_cache(1e-9)
    tiny_wan.meter.reset()
    cached = sample(tiny_wan.velocity_fn(cond), noise, tiny_wan.schedule(6))
    tiny_wan.disable_cache()
    assert torch.equal(cached, plain) and tiny_wan.meter.block_fraction(None, tiny_wan.block_lists) == 1.0


def test_cfg_truncation(tiny_wan):
    cond = tiny_wan.encode_prompt([PROMPT])
    noise, fresh = latent(tiny_wan, (8, 8)), latent(tiny_wan, (4, 4), 1)
    sch = tiny_wan.schedule(6)
    # no CFG at all is the conditional branch alone (guidance 1)
    tiny_wan.meter.reset()
    a = sample(tiny_wan.velocity_fn(cond, acc=Acceleration(cfg_stop=0)), noise, sch)
    assert tiny_wan.meter.forwards[(8, 8)] == 6
    assert torch.equal(a, sample(tiny_wan.velocity_fn(cond, 1.0), noise, sch))
    # no CFG from step 4: 4 guided steps, 2 conditional
    tiny_wan.meter.reset()
    b = sample(tiny_wan.velocity_fn(cond, acc=Acceleration(cfg_stop=4)), noise, sch)
    assert tiny_wan.meter.forwards[(8, 8)] == 4 * 2 + 2
    assert not torch.equal(a, b) and not torch.equal(b, sample(tiny_wan.velocity_fn(cond), noise, sch))
    # no CFG in the low-resolution steps only: the target branch keeps it
    plan = PreviewPlan(sch, switch=2, preview_size=(4, 4), rule="pool")
    tiny_wan.meter.reset()
    p_trunc, t_trunc = pair_sample(tiny_wan.velocity_fn(cond, acc=Acceleration(cfg_low=False)), noise, plan, fresh)
    assert dict(tiny_wan.meter.forwards) == {(8, 8): 12, (4, 4): 4}
    p, t = pair_sample(tiny_wan.velocity_fn(cond), noise, plan, fresh)
    assert torch.equal(t_trunc, t) and not torch.equal(p_trunc, p)


def test_bad_acceleration_settings(tiny_hunyuan):
    with pytest.raises(ConfigError, match="embeds its guidance"):
        tiny_hunyuan.accelerate(Acceleration(cfg_stop=3))
    with pytest.raises(ConfigError, match="cache_threshold"):
        Acceleration(cache_threshold=0).check()
    with pytest.raises(ConfigError, match="cfg_stop"):
        Acceleration(cfg_stop=-1).check()
