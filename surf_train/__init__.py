"""SURF Refiner training framework."""
from pathlib import Path

__version__ = "0.1.0"

# Hydra configs live beside the package in the source tree (editable installs keep it there).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
