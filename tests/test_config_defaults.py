"""Every dataclass default that has a YAML twin in conf/ says what the YAML says (the YAML is what users run)."""

import dataclasses
import inspect
import re

import pytest
from omegaconf import OmegaConf

from surf_train import CONF_DIR
from surf_train.data.datamodule import DataConfig
from surf_train.data.degrade import DegradeConfig
from surf_train.data.pairs import PairsConfig
from surf_train.data.video_pairs import RepreviewConfig, VideoPairsConfig
from surf_train.models.refiner import Refiner, RefinerConfig, num_params, presets
from surf_train.training.module import OptimConfig, RefinerModule
from surf_train.training.objective import BridgeConfig


def yaml(name: str, *keys: str) -> dict:
    node = OmegaConf.load(CONF_DIR / name)
    for k in keys:
        node = node[k]
    return OmegaConf.to_container(node, resolve=False)


def plain(v):
    return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def defaults(obj) -> dict:
    """Field (or keyword argument) -> default, for those that have one."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(obj)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
    return {k: p.default for k, p in inspect.signature(obj).parameters.items() if p.default is not p.empty}


TWINS = [  # (the code's defaults, the YAML file and key path, keys that are not settings of the code)
    (PairsConfig, ("make_pairs.yaml",), {"defaults", "hydra"}),
    (VideoPairsConfig, ("make_video_pairs.yaml",), {"defaults", "hydra", "degrade", "repreview"}),
    (DegradeConfig, ("make_video_pairs.yaml", "degrade"), set()),
    (RepreviewConfig, ("make_video_pairs.yaml", "repreview"), set()),
    (DataConfig, ("data/pairs.yaml",), set()),
    (OptimConfig, ("train.yaml", "module", "optim"), set()),
    # Refiner.__init__'s signature is the Refiner's settings; the tiny preset's sizes left null are read from the
    # shards in training
    (Refiner, ("model/tiny.yaml",), {"preset", "in_channels", "text_dim"}),
    (BridgeConfig, ("train.yaml", "module", "bridge"), set()),
    # decode_base: auto is resolved by train.py from the shards before the module is built (None: no videos)
    (RefinerModule, ("train.yaml", "module"), {"_target_", "model", "bridge", "optim", "decode_base"}),
]


@pytest.mark.parametrize("code, where, extra", TWINS, ids=[t[0].__name__ for t in TWINS])
def test_defaults_match_yaml(code, where, extra):
    y, d = yaml(*where), defaults(code)
    unknown = set(y) - extra - set(inspect.signature(code).parameters)
    assert not unknown, f"{'/'.join(where)} keys the code does not take: {sorted(unknown)}"
    differ = {
        k: (plain(d[k]), v)
        for k, v in y.items()
        if k in d and k not in extra and not (isinstance(v, str) and "${" in v) and plain(d[k]) != v
    }
    assert not differ, f"{code.__name__} default != {'/'.join(where)} (code, yaml): {differ}"


def test_make_pairs_help_names_the_default_pair_count():
    help_text = OmegaConf.load(CONF_DIR / "make_pairs.yaml").hydra.help.template
    assert f"# {yaml('make_pairs.yaml')['num_pairs']} toy pairs into data/pairs" in help_text


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_preset_parameter_count_in_its_yaml(name):
    """The count the preset's yaml states is the built Refiner's (the tiny one with its 32-wide test text)."""
    import torch

    text = (CONF_DIR / "model" / f"{name}.yaml").read_text()
    value, unit = re.search(r"([\d.]+)([MB]) parameters", text).groups()
    with torch.device("meta"):
        n = num_params(Refiner.from_cfg(RefinerConfig.preset(name)))
    assert f"{n / {'M': 1e6, 'B': 1e9}[unit]:.{len(value.partition('.')[2])}f}" == value


def test_experiments_do_not_restate_their_preset():
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        preset = next(
            (d["override /model"] for d in node.get("defaults", []) if isinstance(d, dict) and "override /model" in d),
            None,
        )
        if preset is None:
            continue
        same = {k: v for k, v in node.get("model", {}).items() if plain(presets()[preset].get(k)) == v}
        assert not same, f"{path.name} restates preset {preset}: {same}"


def test_lr_schedule_is_transformers_warmup_cosine():
    """Changed as intended: warmup now starts from 0 at step 0 (transformers'; was 1/warmup), reaches lr at the
    end of the warmup, and from there is the same cosine down to min_lr_ratio * lr at max_steps."""
    import math

    import torch

    from surf_train.training.module import lr_schedule

    o = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
    sched, lrs = lr_schedule(opt, o, 20), []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    old = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)) for s in range(4, 21)]  # the former formula
    assert all(abs(a - b) < 1e-12 for a, b in zip(lrs[4:], old)) and abs(lrs[20] - 0.1) < 1e-12
    const = OptimConfig(lr=1.0, warmup_steps=2, decay="constant")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, lrs = lr_schedule(opt, const, 20), []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.5, 1.0, 1.0]
