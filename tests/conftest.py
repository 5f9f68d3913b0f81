import os

import pytest
import torch

from surf_train.pairs import PairsConfig, make_pairs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_wan():
    from surf_train.base import BaseSpec, load_base_model
    return load_base_model(BaseSpec.from_name("tiny"), "cpu")


@pytest.fixture(scope="session")
def tiny_hunyuan():
    from surf_train.base import BaseSpec, load_base_model
    return load_base_model(BaseSpec.from_name("tiny_hunyuan"), "cpu")


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """24 tiny pairs (latent 16x3x8x8 targets) in 6 shards: 5 train, 1 held out for validation."""
    out = tmp_path_factory.mktemp("pairs")
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    make_pairs(PairsConfig.from_dict({"base": "tiny", "out_dir": str(out), "height": 64, "width": 64, "frames": 9,
                                      "steps": 6, "switch": 2, "num_pairs": 24, "shard_size": 4,
                                      "progress": False}))
    os.environ.update(env)
    return out


@pytest.fixture
def launched():
    """Processes started by a test; whatever is still alive at the end is killed with its descendants."""
    from procs import kill_tree

    procs = []
    yield procs
    for p in procs:
        kill_tree(p)
