"""Wan 2.1 and HunyuanVideo end to end on their tiny models, as the newer families' tests do: pairs, a few training
steps of the family's experiment (shrunk), export, SurfPipeline from the export, and another family's export refused."""

import pytest
import torch
from test_train import FAST, SHRINK, compose_cfg

from surf_train.common.errors import ConfigError

# base -> (experiment, Refiner text width, latent channels)
FAMILIES = {"tiny": ("wan", 32, 16), "tiny_hunyuan": ("hunyuan", 16, 4)}


@pytest.mark.parametrize("base", list(FAMILIES))
def test_pairs_train_export_and_surf_pipeline(base, tmp_path):
    from surf_train.data.pairs import PairsConfig, make_pairs
    from surf_train.inference.pipeline import SurfPipeline
    from surf_train.training.export import export
    from surf_train.training.train import train

    experiment, text_dim, channels = FAMILIES[base]
    pairs = tmp_path / "pairs"
    size = dict(height=64, width=64, frames=9, steps=4, switch=1)
    settings = {"base": base, "out_dir": str(pairs), **size, "num_pairs": 4, "shard_size": 2, "progress": False}
    make_pairs(PairsConfig.from_dict(settings))
    overrides = [f"data.shards={pairs}", f"run_dir={tmp_path}/run", "trainer=cpu", "trainer.max_steps=2"]
    overrides += ["ckpt_every=2", "data.num_workers=0", "data.val_samples=2", *SHRINK, *FAST, "data.batch_size=2"]
    dims = [f"model.text_dim={text_dim}", f"model.in_channels={channels}"]
    s = train(compose_cfg([f"+experiment={experiment}", *overrides, *dims]))
    assert s["steps"] == 2
    out = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "refiner")
    pipe = SurfPipeline.from_surf(base, str(out), "cpu")
    call = dict(height=64, width=64, num_frames=9, num_inference_steps=3, switch=1, refiner_steps=2)
    video = pipe("a red ball rolling", generator=torch.Generator().manual_seed(0), **call).frames
    assert video.shape == (1, 9, 64, 64, 3)
    other = next(b for b in FAMILIES if b != base)
    with pytest.raises(ConfigError, match="latents but base model|trained on base model"):
        SurfPipeline.from_surf(other, str(out), "cpu")
