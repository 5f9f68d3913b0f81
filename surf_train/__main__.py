"""`python -m surf_train` or `surf-train`: train a Refiner (Hydra + Lightning). See `python -m surf_train --help`."""

import faulthandler
import logging
import signal
import sys

import hydra
from omegaconf import DictConfig

from surf_train import CONF_DIR
from surf_train.common.errors import ConfigError
from surf_train.data.shards import ShardError

log = logging.getLogger("surf_train")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    from surf_train.training.train import train

    try:
        summary = train(cfg)
    except Exception as e:
        user = user_error(e)
        if user is None:
            raise
        log.debug("%r", e)  # the log file keeps which call refused it
        print(f"error: {user}", file=sys.stderr)
        sys.exit(2)
    if summary.get("stopped"):  # SIGTERM / SIGINT: saved and stopped, not finished (the shell's 128 + signal)
        sys.exit(128 + signal.Signals[summary["stopped"]])


def user_error(e: BaseException) -> Exception | None:
    """The ConfigError or ShardError behind `e`: Hydra's instantiate wraps one raised in a constructor (e.g.
    RefinerModule's OptimConfig) in an InstantiationException whose cause it is."""
    while e is not None and not isinstance(e, (ConfigError, ShardError)):
        e = e.__cause__
    return e


def cli() -> None:
    from surf_train.training.train import register_resolvers

    register_resolvers()
    faulthandler.enable()  # a rank killed by SIGSEGV/SIGABRT/SIGBUS prints its Python stack instead of vanishing
    main()


if __name__ == "__main__":
    cli()
