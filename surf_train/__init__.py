"""SURF Refiner training framework."""

import warnings
from pathlib import Path

__version__ = "0.1.0"

# Where conf/ and assets/ are read from: a wheel carries them inside the package (surf_train/_data, copied
# by setup.py's build_py); a checkout or an editable install reads the top-level ones beside the package.
_PKG = Path(__file__).resolve().parent
DATA_DIR = _PKG / "_data" if (_PKG / "_data" / "conf").is_dir() else _PKG.parent
CONF_DIR = DATA_DIR / "conf"  # Hydra config tree; conf/base/*.yaml name shipped weights relative to DATA_DIR
ASSETS_DIR = DATA_DIR / "assets"
TOY_REFINER = ASSETS_DIR / "toy_refiner"  # the shipped toy-world Refiner (make toy-refiner): the default one

# Expected, not ours to fix: Lightning (<2.7) builds torch's deprecated LeafSpec in its own pytree helper on
# every step. Silenced by its exact message so that the warnings left mean something.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
