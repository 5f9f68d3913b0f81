"""The settings dataclasses are the one source of defaults: conf/ only overrides them (no YAML restates a default),
unknown keys and wrong choices are refused with one line; the Refiner presets' YAML says what the code builds."""

import dataclasses
import inspect
import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from surf_train import CONF_DIR
from surf_train.__main__ import user_error
from surf_train.common.config import check, defaults, schema
from surf_train.common.errors import ConfigError
from surf_train.data.datamodule import DataConfig
from surf_train.data.degrade import DegradeConfig
from surf_train.data.pairs import PairsConfig
from surf_train.data.video_pairs import RepreviewConfig, VideoPairsConfig
from surf_train.models.refiner import Refiner, RefinerConfig, num_params, presets
from surf_train.training.config import RunConfig
from surf_train.training.module import OptimConfig, RefinerModule
from surf_train.training.objective import BridgeConfig
from surf_train.training.train import register_resolvers


def yaml(name: str, *keys: str) -> dict:
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / name), resolve=False)
    for k in keys:
        node = node.get(k) or {}
    return node


def plain(v):
    return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def module_defaults() -> dict:
    return {k: p.default for k, p in inspect.signature(RefinerModule).parameters.items() if p.default is not p.empty}


# (the code's defaults, the YAML keys path inside each conf file that sets them)
TWINS = [
    (defaults(PairsConfig), ()),
    (defaults(VideoPairsConfig), ()),
    (defaults(DegradeConfig), ("degrade",)),
    (defaults(RepreviewConfig), ("repreview",)),
    (defaults(DataConfig), ("data",)),
    (defaults(RunConfig), ()),
    (module_defaults(), ("module",)),
    (defaults(OptimConfig), ("module", "optim")),
    (defaults(BridgeConfig), ("module", "bridge")),
]
FILES = {"make_pairs.yaml": [0], "make_video_pairs.yaml": [1, 2, 3], "train.yaml": [5, 6, 7, 8]}
EXPERIMENTS = sorted(p.name for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(FILES))
def test_no_yaml_restates_a_default(name):
    """A key in conf/ is there because it differs from the dataclass default (experiments set what they name)."""
    for i in FILES[name]:
        d, where = TWINS[i]
        y = yaml(name, *where)
        same = {k: v for k, v in y.items() if k in d and plain(d[k]) == v and not isinstance(v, dict)}
        assert not same, f"{name} restates the defaults of {'.'.join(where) or 'the top level'}: {same}"
    group = yaml("data/pairs.yaml")
    assert not {k: v for k, v in group.items() if plain(defaults(DataConfig).get(k, object())) == v}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_set_only_known_keys(name):
    for d, where in TWINS[4:]:
        unknown = set(yaml(f"experiment/{name}", *where)) - set(d) - {"defaults", "data", "model", "module", "trainer"}
        assert not unknown, f"experiment/{name}: {'.'.join(where) or 'top-level'} keys no dataclass has: {unknown}"


def compose_train(overrides=()):
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_composed_config_has_the_dataclass_defaults():
    cfg = compose_train()
    assert OmegaConf.to_container(cfg.module.bridge) == {k: plain(v) for k, v in defaults(BridgeConfig).items()}
    assert OmegaConf.to_container(cfg.module.optim) == {k: plain(v) for k, v in defaults(OptimConfig).items()}
    assert RunConfig.from_cfg(cfg) == RunConfig(run_dir="runs/tiny")
    assert DataConfig(**OmegaConf.to_container(cfg.data, resolve=True)) == DataConfig()
    assert cfg.module.decode_base == "auto" and cfg.module.use_text is True


@pytest.mark.parametrize("override", ["module.optim.lr_typo=1", "module.bridge.steps_k=4", "kepp_hpc=3"])
def test_unknown_keys_are_refused_by_composition(override):
    with pytest.raises(ConfigCompositionException) as e:
        compose_train([override])
    assert override.split("=")[0].lstrip("+").split(".")[-1] in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize(
    "override, msg",
    [
        ("module.optim.decay=cosin", "optim.decay='cosin' must be one of cosine | constant"),
        ("module.bridge.noise_space=fine", "bridge.noise_space='fine' must be one of full | detail"),
        ("module.bridge.t_dist=normal", "bridge.t_dist='normal' must be one of logit_normal | uniform"),
        ("module.bridge.steps=0", "bridge.steps=0 must be >= 1"),
        ("+module.bridge.steps_k=4", "module.bridge: unknown settings ['steps_k']"),
    ],
)
def test_wrong_choices_in_the_module_are_one_configerror(override, msg):
    """Hydra's instantiate wraps the constructor's ConfigError; the entry point prints that one line."""
    cfg = compose_train([override, "model.in_channels=4", "model.text_dim=0", "module.decode_base=null"])
    with pytest.raises(Exception) as e:
        instantiate(cfg.module, _convert_="all")
    err = user_error(e.value)
    assert isinstance(err, ConfigError) and str(err) == msg and "\n" not in str(err)


@pytest.mark.parametrize(
    "cls, kw, msg",
    [
        (RunConfig, {"ckpt_every": 0}, "ckpt_every=0 must be >= 1"),
        (RunConfig, {"resume": "yes"}, "resume='yes': expected bool"),
        (DataConfig, {"batch_size": "4"}, "data.batch_size='4': expected int"),
        (RepreviewConfig, {"rule": "snrr"}, "repreview.rule='snrr' must be one of paper | snr | pool"),
        (DegradeConfig, {"down_modes": ["area", "nearest"]}, "degrade.down_modes=('area', 'nearest') must be one of"),
    ],
)
def test_settings_refuse_wrong_types_and_choices(cls, kw, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        cls(**kw)


def test_choices_and_schema_helpers():
    @dataclasses.dataclass
    class S:
        mode: "typing.Literal['a', 'b'] | None" = None  # noqa: F821
        n: int = 1

    import typing

    S.__annotations__["mode"] = typing.Literal["a", "b"] | None
    check(S("a")) or check(S(None))
    with pytest.raises(ConfigError, match="mode='c' must be one of a \\| b"):
        check(S("c"), "")
    assert OmegaConf.to_container(OmegaConf.structured(schema(S))) == {"mode": None, "n": 1}


def test_make_pairs_help_names_the_default_pair_count():
    help_text = OmegaConf.load(CONF_DIR / "make_pairs.yaml").hydra.help.template
    assert f"# {PairsConfig.__dataclass_fields__['num_pairs'].default} toy pairs into data/pairs" in help_text


def test_refiner_defaults_match_the_tiny_preset_yaml():
    """RefinerConfig's defaults are the tiny preset's (the sizes left null are read from the shards in training)."""
    y, d = yaml("model/tiny.yaml"), defaults(RefinerConfig)
    assert not set(y) - {"preset"} - set(d), "model/tiny.yaml keys that RefinerConfig does not take"
    differ = {k: (plain(d[k]), v) for k, v in y.items() if k in d and k not in ("in_channels", "text_dim")}
    differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
    assert not differ, f"RefinerConfig default != model/tiny.yaml (code, yaml): {differ}"


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
