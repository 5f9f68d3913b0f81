import dataclasses

import pytest
import torch

from surf_train.base import BaseSpec, LatentGeometry, load_base_model
from surf_train.common.errors import ConfigError


def latent(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = model.geometry.latent_shape(model.spec.native_frames, *model.spec.native_size)
    return torch.randn(b, *shape, generator=g)


@pytest.mark.parametrize("fixture", ["tiny_wan", "tiny_hunyuan"])
def test_tiny_adapter_shapes(fixture, request):
    m = request.getfixturevalue(fixture)
    cond = m.encode_prompt(["a cat playing piano", "waves at sunset"])
    assert cond.embeds.shape[:2] == (2, m.spec.max_sequence_length)
    x = latent(m)
    v = m.velocity(x, 0.7, cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    video = m.vae_decode(x[:1])
    f, h, w = m.spec.native_frames, *m.spec.native_size
    assert video.shape == (1, 3, f, h, w) and video.abs().max() <= 1
    assert m.vae_encode(video).shape == x[:1].shape


def test_wan_cfg_combines_conditional_and_negative(tiny_wan):
    m = tiny_wan
    cond = m.encode_prompt(["a red ball rolling"])
    assert cond.negative is not None and not torch.equal(cond.embeds, cond.negative)
    x = latent(m, b=1)
    v_pos = m.velocity(x, 0.5, cond, guidance=1.0)  # guidance 1: the conditional branch alone
    v_neg = m.velocity(x, 0.5, dataclasses.replace(cond, embeds=cond.negative), guidance=1.0)
    v = m.velocity(x, 0.5, cond, guidance=4.0)
    assert torch.allclose(v, v_neg + 4.0 * (v_pos - v_neg), atol=1e-4)
    assert not torch.allclose(v_pos, v_neg)


def test_hunyuan_guidance_is_embedded(tiny_hunyuan):
    m = tiny_hunyuan
    cond = m.encode_prompt(["a red ball rolling"])
    x = latent(m, b=1)
    assert not torch.allclose(m.velocity(x, 0.5, cond, guidance=1.0), m.velocity(x, 0.5, cond, guidance=6.0))


@pytest.mark.parametrize("name", ["tiny", "tiny_hunyuan"])
def test_tiny_is_deterministic(name):
    a = load_base_model(BaseSpec.from_name(name), "cpu")
    b = load_base_model(BaseSpec.from_name(name), "cpu")
    for (ka, pa), (kb, pb) in zip(a.pipe.transformer.state_dict().items(), b.pipe.transformer.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb)
    x = latent(a, b=1)
    ca, cb = a.encode_prompt(["snow in a forest"]), b.encode_prompt(["snow in a forest"])
    assert torch.equal(a.velocity(x, 0.3, ca), b.velocity(x, 0.3, cb))


@pytest.mark.parametrize("fixture", ["tiny_wan", "tiny_hunyuan"])
def test_save_pretrained_round_trip(fixture, request, tmp_path):
    """Tiny pipelines saved to disk load back through the from_pretrained path that real weights use."""
    m = request.getfixturevalue(fixture)
    m.pipe.save_pretrained(tmp_path)
    spec = dataclasses.replace(m.spec, pretrained=str(tmp_path), dtype="float32", vae_dtype="float32")
    loaded = load_base_model(spec, "cpu")
    assert type(loaded.pipe) is type(m.pipe)
    x = latent(m, b=1)
    cond_a, cond_b = m.encode_prompt(["a jellyfish"]), loaded.encode_prompt(["a jellyfish"])
    assert torch.allclose(cond_a.embeds, cond_b.embeds, atol=1e-6)
    assert torch.allclose(m.velocity(x, 0.4, cond_a), loaded.velocity(x, 0.4, cond_b), atol=1e-5)
    assert torch.allclose(m.vae_decode(x), loaded.vae_decode(x), atol=1e-5)


def test_loaded_model_must_match_its_config(tiny_wan, tmp_path):
    tiny_wan.pipe.save_pretrained(tmp_path)
    spec = dataclasses.replace(tiny_wan.spec, pretrained=str(tmp_path), channels=32)
    with pytest.raises(ConfigError, match="channels"):
        load_base_model(spec, "cpu")


def test_geometry_rules():
    g = LatentGeometry(channels=16, stride_t=4, stride_s=8, patch_t=1, patch_s=2)
    assert g.latent_shape(81, 720, 1280) == (16, 21, 90, 160)
    with pytest.raises(ConfigError, match="height=100 must be a positive multiple of 16"):
        g.check(81, 100, 1280)
    with pytest.raises(ConfigError, match="frames=80"):
        g.check(80, 720, 1280)


def test_real_configs_parse_and_unknown_name_is_clear():
    for name, fam, size in [
        ("wan2.1_t2v_1.3b", "wan", (480, 832)),
        ("wan2.1_t2v_14b", "wan", (720, 1280)),
        ("hunyuan_video", "hunyuan", (720, 1280)),
    ]:
        spec = BaseSpec.from_name(name)
        assert spec.family == fam and spec.native_size == size and spec.pretrained
        spec.geometry.check(spec.native_frames, *spec.native_size)
    with pytest.raises(ConfigError, match="unknown base model 'nope'"):
        BaseSpec.from_name("nope")


def test_wan_rope_limit_is_checked(tiny_wan):
    tiny_wan.check_grid((64, 64), 5)  # 32 tokens per axis: the tiny model's rope_max_seq_len
    with pytest.raises(ConfigError, match="rope_max_seq_len"):
        tiny_wan.check_grid((66, 64), 5)


def test_a_device_that_is_not_there_is_one_line():
    """--device cuda on a machine without CUDA (or a typo) is one ConfigError, not a traceback from deep in torch."""
    spec = BaseSpec.from_name("tiny")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            load_base_model(spec, "cuda")
    with pytest.raises(ConfigError, match="not a torch device"):
        load_base_model(spec, "gpu0")
