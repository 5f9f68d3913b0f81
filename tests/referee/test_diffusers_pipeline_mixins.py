"""Referee: diffusers' own pipeline tester mixins run against SurfPipeline (issue 26).

    DIFFUSERS_TESTS=/path/to/diffusers pytest tests/referee/test_diffusers_pipeline_mixins.py

DIFFUSERS_TESTS is a diffusers checkout (its `tests/` tree; the mixins at tag v0.40.0 were used). The classes are
set up as diffusers' Wan pipeline test (tests/pipelines/wan/test_wan.py) sets up WanPipeline, on the project's tiny
Wan components (surf_train/base/tiny.py) plus a tiny Refiner, and built as a diffusers user would: from the
components alone (no `base_spec`). Both generations of the mixin run: the pytest one Wan's test uses
(tests/pipelines/testing_utils) and the unittest one (tests/pipelines/test_pipelines_common.py).
"""

import os
import sys
import unittest

import pytest
import torch

ROOT = os.environ.get("DIFFUSERS_TESTS")
if not ROOT:
    pytest.skip("DIFFUSERS_TESTS is unset: point it at a diffusers checkout (its tests/ tree)", allow_module_level=True)
if not os.path.isfile(os.path.join(ROOT, "tests", "pipelines", "test_pipelines_common.py")):
    pytest.skip(f"DIFFUSERS_TESTS={ROOT} has no tests/pipelines/test_pipelines_common.py", allow_module_level=True)
sys.path.insert(0, ROOT)

import diffusers.pipelines  # noqa: E402
from tests.pipelines.pipeline_params import TEXT_TO_IMAGE_BATCH_PARAMS, TEXT_TO_IMAGE_PARAMS  # noqa: E402
from tests.pipelines.testing_utils import (  # noqa: E402
    BasePipelineTesterConfig,
    MemoryTesterMixin,
    PipelineTesterMixin,
)

from surf_train.base.tiny import tiny_wan_pipeline  # noqa: E402
from surf_train.inference.pipeline import SurfPipeline  # noqa: E402
from surf_train.models.refiner import Refiner, RefinerConfig  # noqa: E402

try:  # the unittest mixin's module imports diffusers' model tests, which need `parameterized`
    from tests.pipelines.test_pipelines_common import PipelineTesterMixin as CommonPipelineTesterMixin
except ModuleNotFoundError as e:
    CommonPipelineTesterMixin = type("Missing", (), {})
    COMMON_MISSING = f"tests/pipelines/test_pipelines_common.py needs {e.name}"
else:
    COMMON_MISSING = None

# test_encode_prompt_works_in_isolation reads encode_prompt's source from `diffusers.pipelines.<class name>`
# (ReturnNameVisitor.get_ast_tree), where only diffusers' own pipelines live
diffusers.pipelines.SurfPipeline = SurfPipeline


def tiny_components() -> dict:
    """The tiny Wan pipeline's components, a seeded tiny Refiner, and SurfPipeline's other components unset."""
    wan = tiny_wan_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = RefinerConfig(in_channels=16, patch_size=(1, 2, 2), dim=32, depth=2, heads=2, text_dim=32)
        refiner = Refiner.from_cfg(cfg)
        torch.nn.init.normal_(refiner.proj_out.weight, std=0.02)  # zero-initialised: a no-op Refiner otherwise
    return {
        **wan.components,
        "refiner": refiner,
        "transformer_2": None,
        "text_encoder_2": None,
        "tokenizer_2": None,
        "guider": None,
    }


# Wan's dummy inputs; the prefix is set to the target, as the default (the base's native size) would be larger
INPUTS = {
    "prompt": "dance monkey",
    "negative_prompt": "negative",
    "num_inference_steps": 2,
    "guidance_scale": 6.0,
    "height": 16,
    "width": 16,
    "num_frames": 9,
    "prefix_height": 16,
    "prefix_width": 16,
    "max_sequence_length": 16,
    "output_type": "pt",
}


class SurfPipelineTesterConfig(BasePipelineTesterConfig):
    pipeline_class = SurfPipeline
    required_input_params_in_call_signature = frozenset(
        ["prompt", "negative_prompt", "height", "width", "guidance_scale", "prompt_embeds", "negative_prompt_embeds"]
    )
    batch_input_params = frozenset(["prompt"])
    output_shape = (9, 3, 16, 16)
    optional_input_params = frozenset(
        ["num_inference_steps", "num_videos_per_prompt", "generator", "latents", "output_type", "return_dict"]
    )

    def get_dummy_components(self):
        return tiny_components()

    def get_dummy_inputs(self):
        return {**INPUTS, "generator": self.get_generator(0), "switch": 1, "mode": getattr(self, "mode", "surf")}


class TestSurfPipeline(SurfPipelineTesterConfig, PipelineTesterMixin):
    def test_save_load_optional_components(self, tmp_path, expected_max_difference=1e-4):
        # all optional components None takes the Refiner too, so the calls run as SurfPipeline runs without one
        # (mode "preview"); Wan's own test narrows this test to what its pipeline runs without, too
        self.mode = "preview"
        super().test_save_load_optional_components(tmp_path, expected_max_difference)


class TestSurfPipelineMemory(SurfPipelineTesterConfig, MemoryTesterMixin):
    pass


@pytest.mark.skipif(COMMON_MISSING is not None, reason=str(COMMON_MISSING))
class TestSurfPipelineCommon(CommonPipelineTesterMixin, unittest.TestCase):
    """The unittest mixin, set up as diffusers' Wan test set it up before the pytest mixins."""

    pipeline_class = SurfPipeline
    params = TEXT_TO_IMAGE_PARAMS - {"cross_attention_kwargs"}
    batch_params = TEXT_TO_IMAGE_BATCH_PARAMS
    image_params = frozenset()
    image_latents_params = frozenset()
    required_optional_params = frozenset(
        [
            "num_inference_steps",
            "generator",
            "latents",
            "return_dict",
            "callback_on_step_end",
            "callback_on_step_end_tensor_inputs",
        ]
    )
    test_xformers_attention = False
    supports_dduf = False

    def get_dummy_components(self):
        return tiny_components()

    def get_dummy_inputs(self, device, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return {**INPUTS, "generator": generator, "switch": 1, "mode": getattr(self, "mode", "surf")}

    def test_save_load_optional_components(self, expected_max_difference=1e-4):
        self.mode = "preview"  # as in TestSurfPipeline
        super().test_save_load_optional_components(expected_max_difference)

    def test_attention_slicing_forward_pass(self):
        # as diffusers' HunyuanVideo test: the mean-pixel check converts an image to PIL, which a video is not
        self._test_attention_slicing_forward_pass(test_mean_pixel_difference=False)
