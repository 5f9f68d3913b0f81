import os

import pytest
import torch

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
