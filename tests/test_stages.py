"""The paper's progressive training: stage 1 on short clips, stage 2 at full length from stage 1's weights."""

import pytest
import torch
from omegaconf import OmegaConf
from test_train import FAST, SHRINK, compose_cfg

from surf_train.common.errors import ConfigError
from surf_train.data.datamodule import DataConfig, PairDataModule
from surf_train.training.module import RefinerModule
from surf_train.training.train import train

FAST = [*FAST, "data.val_samples=2", "trainer.val_check_interval=1000"]


def net_weights(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k[4:]: v for k, v in state.items() if k.startswith("net.")}


def test_experiment_configs_compose():
    for name, crop, init in (("wan_stage1", 5, None), ("wan_stage2", None, "runs/wan14b_stage1/checkpoints/last.ckpt")):
        c = compose_cfg([f"+experiment={name}"])
        assert c.data.crop_frames == crop and c.init_from == init and c.model.preset == "paper"
        assert c.module.optim.lr == 5e-5 and c.trainer.strategy.stage == 2  # the rest is the wan experiment
    assert (
        compose_cfg(["+experiment=wan_stage1"]).trainer.max_steps
        + compose_cfg(["+experiment=wan_stage2"]).trainer.max_steps
        == compose_cfg(["+experiment=wan"]).trainer.max_steps
    )
    c = compose_cfg(["+experiment=wan_stage2", "data=mixed"])  # the stages take mixed sources too
    assert set(c.data.sources) == {"generated", "real"} and c.data.batch_size == 1


def test_two_stages_on_mixed_sources(pairs, video_pairs, tmp_path):
    """Stage 1 trains on 2-frame crops of generated + video pairs; stage 2 starts from its weights at full length."""
    data = ["data=mixed", f"data.sources.generated.shards={pairs}", f"data.sources.real.shards={video_pairs[0]}"]
    s1_cfg = compose_cfg(
        ["+experiment=tiny_stage1", *data, f"run_dir={tmp_path}/s1", "trainer.max_steps=6", *FAST, *SHRINK]
    )
    # stage 2 with lr 0: its final weights must be exactly the weights it started from
    s2_args = [
        "+experiment=tiny_stage2",
        *data,
        f"run_dir={tmp_path}/s2",
        "trainer.max_steps=2",
        *FAST,
        *SHRINK,
        "module.optim.lr=0",
        f"init_from={tmp_path}/s1/checkpoints/last.ckpt",
    ]
    s2_cfg = compose_cfg(s2_args)
    # what each stage trains on: short crops, then the full 3 latent frames, from both sources
    for c, frames in ((s1_cfg, 2), (s2_cfg, 3)):
        dm = PairDataModule(DataConfig(**OmegaConf.to_container(c.data, resolve=True)))
        batches = list(dm.train_dataloader())
        assert {b["target"].shape[2] for b in batches} == {frames}
        assert {m["data_source"] for b in batches for m in b["meta"]} == {"generated", "real"}

    s1 = train(s1_cfg)
    assert s1["steps"] == 6 and s1["initialised_from"] is None
    stage1 = net_weights(tmp_path / "s1" / "checkpoints" / "last.ckpt")
    model = torch.load(tmp_path / "s1" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["model"]
    fresh = RefinerModule(model=model).net.state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in stage1.items())  # stage 1 changed the weights

    s2 = train(s2_cfg)
    assert s2["steps"] == 2 and s2["initialised_from"].endswith("s1/checkpoints/last.ckpt")
    assert s2["resumed_from"] is None
    stage2 = net_weights(tmp_path / "s2" / "checkpoints" / "last.ckpt")
    assert stage2.keys() == stage1.keys() and all(torch.equal(v, stage1[k]) for k, v in stage2.items())

    # a rerun of stage 2 resumes from its own checkpoint and does not initialise again (the path is gone)
    again = train(compose_cfg([*s2_args[:-1], "trainer.max_steps=3", f"init_from={tmp_path}/s1/nothing.ckpt"]))
    assert again["steps"] == 3 and again["resumed_from"].endswith("last.ckpt") and again["initialised_from"] is None


def test_init_from_errors(tmp_path):
    m = RefinerModule(model={"preset": "tiny"})
    with pytest.raises(ConfigError, match="checkpoint not found: .*nothing.ckpt"):
        m.init_weights(str(tmp_path / "nothing.ckpt"))
    other = RefinerModule(model={"preset": "tiny", "dim": 32, "heads": 2, "text_dim": 32})
    path = tmp_path / "other.ckpt"
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in other.net.state_dict().items()},
            "hyper_parameters": {"model": {"preset": "tiny", "dim": 32}},
            "global_step": 3,
        },
        path,
    )
    with pytest.raises(ConfigError, match="other.ckpt: weights do not match the Refiner config"):
        m.init_weights(str(path))
    # the module's own weights after loading are the file's (an exported Refiner directory)
    from surf_train.training.export import save_refiner

    save_refiner(other.net.state_dict(), other.model_cfg, tmp_path / "exported")
    again = RefinerModule(model={"preset": "tiny", "dim": 32, "heads": 2, "text_dim": 32})
    assert again.init_weights(str(tmp_path / "exported")) == "exported"
    assert all(torch.equal(v, other.net.state_dict()[k]) for k, v in again.net.state_dict().items())
