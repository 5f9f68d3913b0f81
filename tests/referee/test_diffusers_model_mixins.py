"""diffusers' own model tests on the Refiner: the tester mixins of a diffusers checkout's tests/ tree, set up as its
Wan transformer test (tests/models/transformers/test_models_transformer_wan.py at v0.40.0) sets up
WanTransformer3DModel, on CPU with a tiny config.

    DIFFUSERS_TESTS=/path/to/diffusers pytest tests/referee   # the checkout holding tests/ (tag v0.40.0 or main)

Without DIFFUSERS_TESTS the module skips itself (CI has no diffusers tests tree). The Refiner zeroes its output
projection and adaLN gates at init, so its untrained output is exactly 0; the mixins that compare outputs are also
run on `NonZeroRefiner` (the same class without that zeroing), where equal outputs mean something.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.environ.get("DIFFUSERS_TESTS")
if not ROOT:
    pytest.skip(
        "DIFFUSERS_TESTS is not set (a diffusers checkout holding tests/, see tests/referee/README.md)",
        allow_module_level=True,
    )
if not (Path(ROOT) / "tests" / "models" / "testing_utils" / "__init__.py").is_file():
    raise RuntimeError(f"DIFFUSERS_TESTS={ROOT}: no tests/models/testing_utils/__init__.py there")
sys.path.insert(0, str(Path(ROOT).resolve()))

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from tests.models.testing_utils import (  # noqa: E402  (diffusers' tests package)
    AttentionBackendTesterMixin,
    AttentionTesterMixin,
    BaseModelTesterConfig,
    ModelTesterMixin,
    TorchCompileTesterMixin,
    TrainingTesterMixin,
)
from tests.testing_utils import enable_full_determinism, torch_device  # noqa: E402

from surf_train.models.refiner import Refiner  # noqa: E402


class NonZeroRefiner(Refiner):
    """The Refiner without its zero initialisation: random output projection and gates, a non-zero output."""

    def zero_init(self) -> None:
        pass


@pytest.fixture(scope="module", autouse=True)
def full_determinism():
    """As the Wan test module does at import, but undone after this module (it is process-wide)."""
    before = torch.are_deterministic_algorithms_enabled()
    enable_full_determinism()
    yield
    torch.use_deterministic_algorithms(before)


class RefinerTesterConfig(BaseModelTesterConfig):
    @property
    def model_class(self):
        return Refiner

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (4, 2, 16, 16)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (4, 2, 16, 16)

    @property
    def main_input_name(self) -> str:
        return "x_t"

    def get_init_dict(self) -> dict:
        # token grid (2, 8, 8) in windows (2, 4, 4): plain and shifted blocks, shifted windows of unequal sizes
        return {
            "in_channels": 4,
            "patch_size": (1, 2, 2),
            "dim": 24,
            "depth": 2,
            "heads": 2,
            "mlp_ratio": 32 / 24,
            "window": (2, 4, 4),
            "text_dim": 16,
            "freq_dim": 256,
        }

    def get_dummy_inputs(self) -> dict:
        """Two samples; the second's text is 7 tokens then zero rows (padding the Refiner masks)."""
        g = torch.Generator("cpu").manual_seed(0)
        shape = (2, 4, 2, 16, 16)  # (B, C, F, H, W)
        text = randn_tensor((2, 12, 16), generator=g, device=torch_device, dtype=self.torch_dtype)
        text[1, 7:] = 0
        return {
            "x_t": randn_tensor(shape, generator=g, device=torch_device, dtype=self.torch_dtype),
            "t": torch.rand(2, generator=g).to(torch_device, self.torch_dtype),
            "cond": randn_tensor(shape, generator=g, device=torch_device, dtype=self.torch_dtype),
            "text": text,
        }


class NonZeroTesterConfig(RefinerTesterConfig):
    @property
    def model_class(self):
        return NonZeroRefiner


class TestRefiner(RefinerTesterConfig, ModelTesterMixin):
    """Core model tests."""


class TestRefinerTraining(RefinerTesterConfig, TrainingTesterMixin):
    def test_gradient_checkpointing_is_applied(self):
        super().test_gradient_checkpointing_is_applied(expected_set={"Refiner"})


class TestRefinerAttention(RefinerTesterConfig, AttentionTesterMixin):
    """Processor get/set, processor dicts, QKV fusion."""


class TestRefinerAttentionBackends(RefinerTesterConfig, AttentionBackendTesterMixin):
    """CUDA backends (flash, cuDNN, ...): skipped on CPU."""


class TestRefinerCompile(RefinerTesterConfig, TorchCompileTesterMixin):
    """torch.compile, regional compilation: accelerator-only in diffusers' mixin."""


class TestNonZeroRefiner(NonZeroTesterConfig, ModelTesterMixin):
    """Core model tests where the compared outputs are not all zero."""


class TestNonZeroRefinerTraining(NonZeroTesterConfig, TrainingTesterMixin):
    def test_gradient_checkpointing_is_applied(self):
        super().test_gradient_checkpointing_is_applied(expected_set={"NonZeroRefiner"})


class TestNonZeroRefinerAttention(NonZeroTesterConfig, AttentionTesterMixin):
    """QKV fusion with a non-zero output."""
