"""Commands print no expected noise (issue 17), while an unexpected warning still gets through."""

import subprocess
import sys

from test_train import ROOT

SNIPPET = """
import warnings
warnings.simplefilter("default")
from surf_train.base import BaseSpec, load_base_model
from lightning.pytorch.utilities._pytree import _tree_flatten
load_base_model(BaseSpec.from_name("toy"), "cpu")  # from_pretrained with the toy's stand-in VAE and T5
_tree_flatten({"loss": 1.0})  # what Lightning does on every training step
from diffusers.utils import logging
logging.get_logger("diffusers.pipelines.pipeline_utils").warning(
    "Expected types for transformer: (<class 'X'>,), got <class 'Y'>.")
"""


def test_loading_and_stepping_print_no_known_noise():
    r = subprocess.run([sys.executable, "-c", SNIPPET], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for noise in ("torch_dtype", "LeafSpec", "Expected types for vae", "Expected types for text_encoder"):
        assert noise not in r.stderr, r.stderr[-2000:]
    assert "Expected types for transformer" in r.stderr  # other type mismatches are still reported
