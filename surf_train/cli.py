"""Hydra entry points of the pair writers: `surf-make-pairs` and `surf-make-video-pairs` (console scripts), also
run by data_prep/make_pairs.py and data_prep/make_video_pairs.py. Configs come from surf_train.CONF_DIR, so they
work from any directory in a checkout, an editable install or a wheel."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from surf_train import CONF_DIR
from surf_train.common.errors import ConfigError
from surf_train.data.pairs import PairsConfig, out_dir_arg_error
from surf_train.data.shards import ShardError
from surf_train.data.video_pairs import VideoPairsConfig


def _run(prog: str, fn, cls, cfg: DictConfig) -> None:
    """fn(cls from the composed config); a ConfigError or ShardError: one `error:` line, exit status 2."""
    try:
        fn(cls.from_dict(OmegaConf.to_container(cfg, resolve=True)))
    except (ConfigError, ShardError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="make_pairs")
def _make_pairs(cfg: DictConfig) -> None:
    from surf_train.data.pairs import make_pairs

    _run("make_pairs", make_pairs, PairsConfig, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="make_video_pairs")
def _make_video_pairs(cfg: DictConfig) -> None:
    from surf_train.data.video_pairs import make_video_pairs

    _run("make_video_pairs", make_video_pairs, VideoPairsConfig, cfg)


def _refuse_file_out_dir(prog: str) -> None:
    if out_dir_arg_error(sys.argv[1:]):
        print(f"{prog}: error: {out_dir_arg_error(sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)


def make_pairs() -> None:
    _refuse_file_out_dir("make_pairs")
    _make_pairs()


def make_video_pairs() -> None:
    _refuse_file_out_dir("make_video_pairs")
    _make_video_pairs()
