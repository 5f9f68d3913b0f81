"""SURF Refiner training framework."""
import warnings
from pathlib import Path

__version__ = "0.1.0"

# Hydra configs live beside the package in the source tree (editable installs keep it there).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Expected, not ours to fix: Lightning (<2.7) builds torch's deprecated LeafSpec in its own pytree helper on
# every step. Silenced by its exact message so that the warnings left mean something.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
