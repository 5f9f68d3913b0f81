"""Write (preview, target) latent pairs into WebDataset shards. `python data_prep/make_pairs.py --help`."""
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from surf_train.errors import ConfigError
from surf_train.pairs import PairsConfig, make_pairs, out_dir_arg_error
from surf_train.shards import ShardError

log = logging.getLogger("make_pairs")


@hydra.main(version_base="1.3", config_path="../conf", config_name="make_pairs")
def main(cfg: DictConfig) -> None:
    try:
        make_pairs(PairsConfig.from_dict(OmegaConf.to_container(cfg, resolve=True)))
    except (ConfigError, ShardError) as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    if out_dir_arg_error(sys.argv[1:]):
        print(f"make_pairs: error: {out_dir_arg_error(sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)
    main()
