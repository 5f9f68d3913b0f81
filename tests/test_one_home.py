"""One home per setting: each list of choices and the latent-frame formula are written once in surf_train."""

import ast
import re
from pathlib import Path

import surf_train
from surf_train.base.sampling import DOWN_MODES, RULES, SCHEDULERS, UP_MODES
from surf_train.common.dtypes import DTYPES
from surf_train.data import degrade
from surf_train.models.windows import IMPLS
from surf_train.training import objective

ROOT = Path(surf_train.__file__).parent
CHOICES = {  # choice list -> the module that defines it
    frozenset(RULES): "base/sampling.py",
    frozenset(DOWN_MODES): "base/sampling.py",
    frozenset(UP_MODES): "base/sampling.py",
    frozenset(SCHEDULERS): "base/sampling.py",
    frozenset(IMPLS): "models/windows.py",
    frozenset(DTYPES): "common/dtypes.py",
}


def string_collections(tree: ast.AST):
    """Every tuple, list, set or dict literal of two or more strings (a dict by its keys), with its line."""
    for node in ast.walk(tree):
        elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if (
            isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict))
            and len(elts) > 1
            and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts)
        ):
            yield frozenset(e.value for e in elts), node.lineno


def test_each_choice_list_is_written_once():
    restated = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in sorted(ROOT.rglob("*.py"))
        for names, line in string_collections(ast.parse(p.read_text()))
        if names in CHOICES and p.relative_to(ROOT).as_posix() != CHOICES[names]
    ]
    assert not restated, f"choice lists restated (import them from their module instead): {restated}"


def test_latent_frame_formula_is_written_once():
    formula = re.compile(r"-\s*1\)\s*//\s*[\w.]*stride_t\s*\+\s*1")
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted(ROOT.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if formula.search(line)
    ]
    assert found == ["base/spec.py:" + str(_line_of("base/spec.py", "return (frames - 1) // stride_t + 1"))]


def _line_of(path: str, text: str) -> int:
    return next(i for i, line in enumerate((ROOT / path).read_text().splitlines(), 1) if text in line)


def test_two_latent_degradations_have_two_names():
    assert hasattr(degrade, "degrade_latent") and hasattr(objective, "augment_cond")
    assert not hasattr(objective, "degrade_latent")


def test_frames_come_from_diffusers_video_processor():
    """Decoded videos become frames as the diffusers pipelines make them: (x / 2 + 0.5) clamped, (B, F, H, W, 3)."""
    import torch

    from surf_train.base.vae import to_frames

    video = torch.linspace(-1.2, 1.2, 2 * 3 * 5 * 4 * 6).reshape(2, 3, 5, 4, 6)
    frames = to_frames(video)
    assert frames.shape == (2, 5, 4, 6, 3)
    assert torch.equal(torch.from_numpy(frames), (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1))
    assert "VideoProcessor" in (ROOT / "base" / "vae.py").read_text()
    assert "permute(1, 2, 3, 0) + 1) / 2" not in (ROOT / "training" / "module.py").read_text()
