"""A non-editable install works outside the checkout: sdist -> wheel -> fresh venv (no network, the dependencies
already installed here) -> the console scripts run pairs -> train -> export -> generate from an unrelated directory."""
import glob
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = {".git", ".venv", ".whl", "data", "outputs", "runs", "wandb", "build", "dist", ".pytest_cache"}


def _ignore(d, names):
    top = Path(d).resolve() == ROOT
    return [n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in NOT_SOURCE)]


def _run(cmd, cwd, env, timeout=300):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from the sdist of a copy of this tree (the sdist must carry conf/ and assets/ too)."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp / 'sdist')!r})"],
         src, os.environ)
    (sdist,) = glob.glob(str(tmp / "sdist" / "*.tar.gz"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
          "-w", str(tmp / "wheel"), sdist], tmp, os.environ)
    (whl,) = glob.glob(str(tmp / "wheel" / "*.whl"))
    return Path(whl)


def test_wheel_holds_configs_assets_and_marker(wheel):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    conf = {str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")}
    assets = {str(p.relative_to(ROOT)) for p in (ROOT / "assets").rglob("*") if p.is_file()}
    assert conf and assets and {f"surf_train/_data/{n}" for n in conf | assets} <= names
    assert "surf_train/py.typed" in names

