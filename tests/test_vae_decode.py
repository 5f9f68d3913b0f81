"""Validation videos decode with the base model's VAE alone (issue 17): no transformer, no text encoder."""

import dataclasses

import pytest
import torch
from diffusers.models.modeling_utils import ModelMixin
from transformers import PreTrainedModel

from surf_train.base.vae import LatentDecoder


@pytest.fixture
def built(monkeypatch):
    """Names of the diffusers / transformers models constructed or loaded while the fixture is active."""
    names = []
    for cls in (ModelMixin, PreTrainedModel):
        init = cls.__init__

        def spy(self, *a, _init=init, **k):
            names.append(type(self).__name__)
            _init(self, *a, **k)

        monkeypatch.setattr(cls, "__init__", spy)
    return names


def _latent(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = model.geometry.latent_shape(model.spec.native_frames, *model.spec.native_size)
    return torch.randn(1, *shape, generator=g)


@pytest.mark.parametrize("fixture", ["tiny_wan", "tiny_hunyuan"])
def test_decoder_builds_only_the_vae_and_decodes_as_the_pipeline(fixture, request, built):
    model = request.getfixturevalue(fixture)  # the spy sees its transformer and text encoders if built now
    built.clear()
    x = _latent(model)
    dec = LatentDecoder(model.spec, "cpu")
    assert built == [type(model.pipe.vae).__name__]
    assert torch.allclose(dec.decode(x), model.vae_decode(x), atol=1e-6)  # same weights, same normalisation


def test_decoder_loads_only_the_vae_from_a_saved_pipeline(tiny_wan, tmp_path, built):
    tiny_wan.pipe.save_pretrained(tmp_path)
    built.clear()
    spec = dataclasses.replace(tiny_wan.spec, pretrained=str(tmp_path), dtype="float32")
    x = _latent(tiny_wan)
    dec = LatentDecoder(spec, "cpu")
    assert built == ["AutoencoderKLWan"]
    assert torch.allclose(dec.decode(x), tiny_wan.vae_decode(x), atol=1e-5)


def test_validation_videos_load_no_transformer(pairs, tmp_path, built):
    """A training run with validation videos on the tiny Wan: the decode builds AutoencoderKLWan and nothing else."""
    from test_train import SHRINK, compose_cfg

    from surf_train.training.train import train

    cfg = compose_cfg(
        [
            f"data.shards={pairs}",
            f"run_dir={tmp_path}",
            "trainer.max_steps=2",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "data.batch_size=2",
            "data.val_samples=2",
            "module.decode_base=tiny",
            "trainer.val_check_interval=2",
            "module.val_videos=1",
            *SHRINK,
        ]
    )
    train(cfg)
    assert list((tmp_path / "videos").glob("*.mp4"))
    assert "WanTransformer3DModel" not in built and "T5EncoderModel" not in built
    assert built.count("AutoencoderKLWan") == 1


def test_large_decodes_are_tiled(tiny_wan):
    """Above the VAE's minimum tile (Wan: 256 px) the decoder works tile by tile and still matches closely."""
    dec = LatentDecoder(tiny_wan.spec, "cpu")
    assert dec.vae.use_tiling
    x = torch.randn(1, 16, 1, 48, 48, generator=torch.Generator().manual_seed(0))  # 384 x 384 px
    calls = []
    tiled = dec.vae.tiled_decode
    dec.vae.tiled_decode = lambda *a, **k: calls.append(1) or tiled(*a, **k)
    video = dec.decode(x)
    assert calls and video.shape == (1, 3, 1, 384, 384)
    whole = LatentDecoder(tiny_wan.spec, "cpu", tiling=False).decode(x)
    assert (video - whole).abs().mean() < 0.05 * whole.abs().mean()  # overlapping tiles are blended
