"""Refiner network: shapes, init, gradients, checkpointing, text, presets, config, Wan initialisation."""

import json
import time

import pytest
import torch

from surf_train.base.tiny import TINY_WAN_TRANSFORMER
from surf_train.common.errors import ConfigError
from surf_train.models.refiner import Refiner, RefinerConfig, init_from_wan, num_params, presets

WAN_TINY = TINY_WAN_TRANSFORMER


def _perturb(model: Refiner, seed: int = 0) -> Refiner:
    """Lift the zero-inits (output projection, adaLN gates) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _inputs(shape=(2, 16, 3, 8, 8), text_len=5, text_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    cond = torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g)
    text = torch.randn(shape[0], text_len, text_dim, generator=g)
    return x, t, cond, text


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _perturb(Refiner.from_cfg(RefinerConfig.preset("tiny")))


@pytest.mark.parametrize("shape", [(1, 16, 5, 16, 16), (2, 16, 5, 14, 18), (1, 16, 1, 2, 2)])
def test_output_shape(tiny, shape):
    x, t, cond, text = _inputs(shape)
    with torch.no_grad():
        out = tiny(x, t, cond, text).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_patch_with_time_extent():
    m = _perturb(Refiner.from_cfg(RefinerConfig(patch_size=(2, 2, 2), window=(2, 3, 3), depth=2)))
    x, t, cond, _ = _inputs((1, 16, 6, 10, 14))
    with torch.no_grad():
        assert m(x, t, cond).sample.shape == x.shape


def test_untrained_output_is_zero():
    m = Refiner.from_cfg(RefinerConfig.preset("tiny"))
    x, t, cond, text = _inputs()
    with torch.no_grad():
        assert torch.equal(m(x, t, cond, text).sample, torch.zeros_like(x))


def test_blocks_alternate_plain_and_shifted():
    m = Refiner.from_cfg(RefinerConfig(depth=4))
    assert [b.attn1.shift for b in m.blocks] == [False, True, False, True]


def test_gradients_reach_every_parameter():
    m = _perturb(Refiner.from_cfg(RefinerConfig.preset("tiny")))
    x, t, cond, text = _inputs((1, 16, 3, 10, 10))
    (m(x, t, cond, text).sample ** 2).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_grad_checkpointing_matches():
    torch.manual_seed(1)
    base = _perturb(Refiner.from_cfg(RefinerConfig(depth=2)))
    ckpt = Refiner.from_cfg(RefinerConfig(depth=2, grad_checkpointing=True))
    ckpt.load_state_dict(base.state_dict())
    x, t, cond, text = _inputs((1, 16, 3, 10, 10))
    outs, grads = [], []
    for m in (base, ckpt):
        xi = x.clone().requires_grad_()
        out = m(xi, t, cond, text).sample
        (out**2).mean().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_attn_impls_agree(tiny):
    x, t, cond, text = _inputs((1, 16, 5, 14, 18))
    grouped = Refiner.from_cfg(RefinerConfig.preset("tiny", attn_impl="grouped"))
    mask = Refiner.from_cfg(RefinerConfig.preset("tiny", attn_impl="mask"))
    grouped.load_state_dict(tiny.state_dict())
    mask.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            grouped(x, t, cond, text).sample, mask(x, t, cond, text).sample, atol=1e-5, rtol=1e-5
        )


def test_text_and_text_mask(tiny):
    x, t, cond, text = _inputs()
    with torch.no_grad():
        no_text = tiny(x, t, cond).sample
        with_text = tiny(x, t, cond, text).sample
        assert not torch.allclose(no_text, with_text, atol=1e-4)
        # Masked text tokens are ignored: masking the last 2 equals dropping them.
        mask = torch.ones(text.shape[:2], dtype=torch.bool)
        mask[:, 3:] = False
        torch.testing.assert_close(
            tiny(x, t, cond, text, mask).sample, tiny(x, t, cond, text[:, :3]).sample, atol=1e-5, rtol=1e-5
        )
        # A sample with no valid text token gets no cross-attention contribution.
        torch.testing.assert_close(tiny(x, t, cond, text, torch.zeros_like(mask)).sample, no_text, atol=1e-5, rtol=1e-5)


def test_cond_and_time_matter(tiny):
    x, t, cond, _ = _inputs()
    with torch.no_grad():
        out = tiny(x, t, cond).sample
        assert not torch.allclose(out, tiny(x, t, cond + 1.0).sample, atol=1e-4)
        assert not torch.allclose(out, tiny(x, 1.0 - t, cond).sample, atol=1e-4)


def test_one_plain_block_is_local():
    """Depth 1 (plain windows): a change in one latent pixel moves the output only inside its window."""
    m = _perturb(Refiner.from_cfg(RefinerConfig(depth=1, window=(1, 2, 2), text_dim=0)))
    x, t, cond, _ = _inputs((1, 16, 2, 8, 8))
    x2 = x.clone()
    x2[0, :, 1, 5, 2] += 1.0  # token (1, 2, 1) -> window rows 4..7, cols 0..3 of frame 1
    with torch.no_grad():
        changed = (m(x, t, cond).sample != m(x2, t, cond).sample).any(1)[0]  # (F, H, W)
    expected = torch.zeros_like(changed)
    expected[1, 4:8, 0:4] = True
    assert torch.equal(changed, expected)


def test_tiny_preset_is_small_and_fast():
    m = Refiner.from_cfg(RefinerConfig.preset("tiny"))
    assert num_params(m) < 500_000
    x, t, cond, text = _inputs((1, 16, 5, 16, 16))
    with torch.no_grad():
        m(x, t, cond, text)
        times = []
        for _ in range(3):  # best of 3: a shared CPU can stall one call
            start = time.perf_counter()
            m(x, t, cond, text)
            times.append(time.perf_counter() - start)
    assert min(times) < 1.0


def test_paper_preset_size():
    with torch.device("meta"):
        m = Refiner.from_cfg(RefinerConfig.preset("paper"))
    assert 0.8e9 < num_params(m) < 1.3e9
    assert m.cfg.text_dim == 4096


def test_config_round_trip():
    for name in presets():
        cfg = RefinerConfig.preset(name, grad_checkpointing=True)
        back = RefinerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and isinstance(back.window, tuple)
    with pytest.raises(ValueError, match="unknown"):
        RefinerConfig.from_dict({"dims": 3})
    with pytest.raises(ValueError, match="divisible"):
        RefinerConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="attn_impl"):
        RefinerConfig(attn_impl="flash")


def test_bad_shapes_raise(tiny):
    x, t, cond, text = _inputs((1, 16, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(3, 8, 9\).*patch_size"):
        bad = torch.randn(1, 16, 3, 8, 9)
        tiny(bad, t, bad)
    with pytest.raises(ValueError, match="cond shape"):
        tiny(x, t, cond[:, :, :2])
    with pytest.raises(ValueError, match=r"x_t must be \(B, 16"):
        tiny(x[:, :8], t, cond[:, :8])
    with pytest.raises(ValueError, match=r"t must be"):
        tiny(x, torch.rand(2), cond)
    with pytest.raises(ValueError, match="text must be"):
        tiny(x, t, cond, text[..., :8])
    with pytest.raises(ValueError, match="text_dim=0"):
        Refiner.from_cfg(RefinerConfig(text_dim=0))(x, t, cond, text)


# --- initialisation from Wan -------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_tiny(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wan")
    WanTransformer3DModel(**WAN_TINY).save_pretrained(path)
    return WanTransformer3DModel.from_pretrained(path).eval(), path


def test_init_from_wan_copies_and_zeroes_cond(wan_tiny):
    wan, path = wan_tiny
    ref, report = Refiner.from_wan_transformer(path)  # from a saved directory
    src = wan.state_dict()
    assert len(src) == 69 and len(report.copied) == 69  # every Wan tensor has a counterpart
    assert report.skipped == {} and report.not_initialised == []
    own = ref.state_dict()
    w = own["patch_embedding.weight"]  # (D, 2C, 1, 2, 2)
    assert torch.equal(w[:, :16], src["patch_embedding.weight"]) and torch.equal(w[:, 16:], torch.zeros_like(w[:, 16:]))
    for key in report.copied:
        wkey = key.replace("to_out.", "to_out.0.").replace("fc1.", "net.0.proj.").replace("fc2.", "net.2.")
        if key != "patch_embedding.weight":
            assert torch.equal(own[key], src[wkey]), key


def test_init_from_wan_block_subset(wan_tiny):
    wan, _ = wan_tiny
    ref, report = Refiner.from_wan_transformer(wan, depth=1)
    assert len(report.copied) == 42 and len(report.skipped) == 27
    assert all(k.startswith("blocks.1.") and why == "block not used" for k, why in report.skipped.items())
    ref2 = Refiner.from_cfg(ref.cfg)
    report2 = init_from_wan(ref2, wan.state_dict(), wan_blocks=[1])
    assert len(report2.copied) == 42
    assert torch.equal(ref2.blocks[0].attn1.to_q.weight, wan.blocks[1].attn1.to_q.weight)


def test_init_from_wan_reports_shape_mismatch(wan_tiny):
    wan, _ = wan_tiny
    ref = Refiner.from_cfg(RefinerConfig(dim=24, heads=2, depth=2, mlp_ratio=2.0, text_dim=32))  # ffn 48 != 32
    report = init_from_wan(ref, wan.state_dict())
    assert "blocks.0.ffn.net.0.proj.weight" in report.skipped
    assert "blocks.0.ffn.fc1.weight" in report.not_initialised
    assert len(report.copied) == 69 - 2 * 3  # fc1 weight, fc1 bias, fc2 weight per block; fc2 bias fits


def test_ffn_conv_mixes_across_the_window_cut_and_stays_in_the_frame():
    """ffn_conv=3: the same one-pixel change also reaches the 3x3 token neighbourhood beyond the window, same frame."""
    m = _perturb(Refiner.from_cfg(RefinerConfig(depth=1, window=(1, 2, 2), text_dim=0, ffn_conv=3)))
    x, t, cond, _ = _inputs((1, 16, 2, 8, 8))
    x2 = x.clone()
    x2[0, :, 1, 5, 2] += 1.0  # token (1, 2, 1): window tokens rows 2..3, cols 0..1 of frame 1
    with torch.no_grad():
        changed = (m(x, t, cond).sample != m(x2, t, cond).sample).any(1)[0]  # (F, H, W) latent pixels
    tokens = changed.unflatten(1, (4, 2)).unflatten(3, (4, 2)).any(4).any(2)  # (F, 4, 4) tokens
    expected = torch.zeros_like(tokens)
    expected[1, 1:4, 0:3] = True  # the window's tokens and every 3x3 neighbour of a changed token
    assert torch.equal(tokens, expected)
    with pytest.raises(ConfigError, match="ffn_conv"):
        RefinerConfig(ffn_conv=2)


@pytest.mark.parametrize("head_dim", [12, 16])  # 16: RoPE split (8, 4, 4) is not symmetric
def test_wan_initialised_refiner_with_global_window_equals_wan(wan_tiny, head_dim):
    """Window covering the grid: the refiner is Wan on x_t (cond channels are zero), t scaled by 1000."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(1)
    wan = wan_tiny[0] if head_dim == 12 else WanTransformer3DModel(**{**WAN_TINY, "attention_head_dim": head_dim})
    wan.eval()
    ref, _ = Refiner.from_wan_transformer(wan, window=(-1, -1, -1))
    with_conv, _ = Refiner.from_wan_transformer(wan, window=(-1, -1, -1), ffn_conv=3)  # the conv starts at zero
    x, t, cond, text = _inputs((2, 16, 3, 6, 8))
    with torch.no_grad():
        expected = wan(x, t * 1000, text).sample
        torch.testing.assert_close(ref(x, t, cond, text).sample, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(with_conv(x, t, cond, text).sample, expected, atol=1e-5, rtol=1e-5)
        windowed, _ = Refiner.from_wan_transformer(wan, window=(1, 2, 2))
        assert not torch.allclose(windowed(x, t, cond, text).sample, expected, atol=1e-3)


# --- the Refiner as a diffusers model ----------------------------------------------------------


def test_refiner_config_is_derived_from_the_init_signature():
    """Refiner.__init__'s keyword arguments are the one list of settings: RefinerConfig has exactly them, in order,
    with their defaults and types (attn_impl's Literal choices are windows.IMPLS)."""
    import dataclasses
    import inspect
    import typing

    from surf_train.models.windows import IMPLS

    params = list(inspect.signature(Refiner.__init__).parameters.values())[1:]
    fields = dataclasses.fields(RefinerConfig)
    assert [(p.name, p.default) for p in params] == [(f.name, f.default) for f in fields]
    assert typing.get_args({f.name: f.type for f in fields}["attn_impl"]) == IMPLS
    assert Refiner().cfg == RefinerConfig()
    # to_dict keeps the field order that surf.json and the cost reports were written with
    assert list(RefinerConfig().to_dict())[-5:] == [
        "qk_norm",
        "grad_checkpointing",
        "attn_impl",
        "ffn_conv",
        "kind_condition",
    ]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"attn_impl": "flash"}, "attn_impl"),
        ({"heads": 0}, "heads"),
        ({"text_dim": -1}, "text_dim"),
        ({"dim": 30, "heads": 4}, "dim"),
        ({"patch_size": (1, 2)}, "patch_size"),
        ({"window": (2, 4)}, "window"),
        ({"ffn_conv": 2}, "ffn_conv"),
    ],
)
def test_invalid_setting_is_a_config_error_naming_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        RefinerConfig(**bad)
    with pytest.raises(ConfigError, match=field):
        Refiner(**bad)


def test_presets_are_the_composed_model_node(monkeypatch):
    """presets() composes conf/model like training does; a node Hydra composed is read as it is (no second reading
    of the YAML), a partial one (tests, older checkpoints) is filled from its preset."""
    from hydra import compose, initialize_config_dir

    import surf_train.training.config  # noqa: F401  (puts train.yaml's schema into Hydra's ConfigStore)
    from surf_train import CONF_DIR
    from surf_train.models import refiner as R

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        node = compose("train", overrides=["model=toy"]).model
        assert R.presets()["toy"] == R.refiner_config(node).to_dict() | {"patch_size": (1, 2, 2), "window": (2, 4, 4)}
    assert sorted(presets()) == ["paper", "ti2v", "tiny", "toy"]
    full, paper = RefinerConfig.preset("paper").to_dict(), RefinerConfig.preset("paper")
    with monkeypatch.context() as m:
        m.setattr(R, "presets", lambda: pytest.fail("a complete node read the presets"))
        assert R.refiner_config({"preset": "paper", **full}) == paper
    old = {k: v for k, v in full.items() if k not in ("freq_dim", "rope_theta")}
    assert R.refiner_config({"preset": "paper", **old}) == paper
    assert R.refiner_config({"preset": "toy", "dim": 64}) == RefinerConfig.preset("toy", dim=64)
    with pytest.raises(ConfigError, match="unknown refiner preset"):
        R.refiner_config({"preset": "huge"})
    with pytest.raises(ConfigError, match="model.in_channels"):
        R.refiner_config({"preset": "tiny", "in_channels": None})


def test_from_pretrained_round_trips_bit_for_bit(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    back = Refiner.from_pretrained(tmp_path / "m")
    assert back.cfg == tiny.cfg and not back.training
    x, t, cond, text = _inputs((2, 16, 3, 10, 10))
    with torch.no_grad():
        assert torch.equal(back(x, t, cond, text).sample, tiny(x, t, cond, text).sample)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in back.state_dict().items())


def test_from_pretrained_subfolder_and_bf16_keeps_fp32_modules(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "repo" / "refiner")
    m = Refiner.from_pretrained(tmp_path / "repo", subfolder="refiner", torch_dtype=torch.bfloat16)
    kept = {n for n, p in m.named_parameters() if p.dtype == torch.float32}
    assert kept and all(p.dtype == torch.bfloat16 for n, p in m.named_parameters() if n not in kept)
    for n in [
        "scale_shift_table",
        "blocks.0.scale_shift_table",
        "blocks.0.attn1.norm_q.weight",
        "blocks.1.attn2.norm_k.weight",
        "blocks.0.norm2.weight",
        "condition_embedder.time_embedder.linear_1.weight",
    ]:
        assert n in kept, n
    assert "blocks.0.attn1.to_q.weight" not in kept and m.dtype == torch.bfloat16
    x, t, cond, text = _inputs((1, 16, 3, 8, 8))
    with torch.no_grad():  # mixed float32 / bf16 layers run, close to the float32 model
        out = m(x.bfloat16(), t.bfloat16(), cond.bfloat16(), text.bfloat16()).sample
        ref = tiny(x, t, cond, text).sample
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() < 0.05 * ref.norm()


def test_enable_gradient_checkpointing_is_the_config_switch(tmp_path):
    torch.manual_seed(2)
    base = _perturb(Refiner.from_cfg(RefinerConfig(depth=2)))
    on = Refiner.from_cfg(RefinerConfig(depth=2))
    on.load_state_dict(base.state_dict())
    on.enable_gradient_checkpointing()
    assert on.is_gradient_checkpointing and on.cfg.grad_checkpointing and not base.cfg.grad_checkpointing
    assert Refiner.from_cfg(RefinerConfig(depth=2, grad_checkpointing=True)).is_gradient_checkpointing
    calls = []
    orig = on._gradient_checkpointing_func
    on._gradient_checkpointing_func = lambda blk, *a: calls.append(blk) or orig(blk, *a)
    x, t, cond, text = _inputs((1, 16, 3, 10, 10))
    grads = []
    for m in (base, on):
        m.zero_grad()
        (m(x, t, cond, text).sample ** 2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    assert len(calls) == 2  # one checkpointed call per block
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    on.save_pretrained(tmp_path / "m")  # a training switch, not part of the model
    assert "grad_checkpointing" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert not Refiner.from_pretrained(tmp_path / "m").is_gradient_checkpointing


def test_to_dtype_casts_as_from_pretrained_loads(tiny, tmp_path):
    import logging

    from diffusers.utils import logging as diffusers_logging

    tiny.save_pretrained(tmp_path / "m")
    loaded = Refiner.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    cast = Refiner.from_cfg(tiny.cfg)
    cast.load_state_dict(tiny.state_dict())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        cast.to_dtype(torch.bfloat16)
        Refiner.from_cfg(tiny.cfg).to(torch.float16)  # what diffusers warns about
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert [r.getMessage()[:40] for r in records] == ["There are modules in Refiner that should"]
    assert {n: p.dtype for n, p in cast.named_parameters()} == {n: p.dtype for n, p in loaded.named_parameters()}
    assert all(torch.equal(p, loaded.state_dict()[n]) for n, p in cast.state_dict().items())
