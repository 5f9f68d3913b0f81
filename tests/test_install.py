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
SCRIPTS = [
    "surf-make-pairs",
    "surf-make-video-pairs",
    "surf-train",
    "surf-export",
    "surf-generate",
    "surf-evaluate",
    "surf-flops",
]
NOT_SOURCE = {".git", ".venv", ".whl", "data", "outputs", "runs", "wandb", "build", "dist", ".pytest_cache"}


def _ignore(d, names):
    top = Path(d).resolve() == ROOT
    return [n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in NOT_SOURCE)]


def _copy_tree(tmp: Path) -> Path:
    shutil.copytree(ROOT, tmp / "src", ignore=_ignore)
    return tmp / "src"


def _venv(tmp: Path) -> tuple[Path, str, dict]:
    """A fresh venv using this interpreter's packages (pip and the dependencies): its bin/, site-packages, env.

    A path line in a .pth goes after the venv's own site-packages, and the .pth files in that path (an editable
    surf_train among them) are not run."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    host = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    Path(purelib, "_host_site_packages.pth").write_text("".join(f"{p}\n" for p in host))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return venv / "bin", purelib, env


def _run(cmd, cwd, env, timeout=300):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from the sdist of a copy of this tree (the sdist must carry conf/ and assets/ too)."""
    tmp = tmp_path_factory.mktemp("build")
    src = _copy_tree(tmp)
    _run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp / 'sdist')!r})"],
        src,
        os.environ,
    )
    (sdist,) = glob.glob(str(tmp / "sdist" / "*.tar.gz"))
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-w",
            str(tmp / "wheel"),
            sdist,
        ],
        tmp,
        os.environ,
    )
    (whl,) = glob.glob(str(tmp / "wheel" / "*.whl"))
    return Path(whl)


def test_wheel_holds_configs_assets_marker_and_scripts(wheel):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    conf = {str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")}
    assets = {str(p.relative_to(ROOT)) for p in (ROOT / "assets").rglob("*") if p.is_file()}
    assert conf and assets and {f"surf_train/_data/{n}" for n in conf | assets} <= names
    assert "surf_train/py.typed" in names
    (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert [line.split(" = ")[0] for line in z.read(ep).decode().splitlines() if " = " in line] == sorted(SCRIPTS)


def test_rebuild_in_the_tree_drops_removed_configs(tmp_path):
    """`pip wheel .` builds in the tree's build/: a config removed since an earlier build is not shipped."""
    src = _copy_tree(tmp_path)
    (src / "conf/experiment/gone.yaml").write_text("{}\n")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-w"]
    _run([*cmd, str(tmp_path / "w1"), "."], src, os.environ)
    (src / "conf/experiment/gone.yaml").unlink()
    _run([*cmd, str(tmp_path / "w2"), "."], src, os.environ)
    ((w1,), (w2,)) = (glob.glob(str(tmp_path / w / "*.whl")) for w in ("w1", "w2"))
    gone = "surf_train/_data/conf/experiment/gone.yaml"
    assert gone in zipfile.ZipFile(w1).namelist() and gone not in zipfile.ZipFile(w2).namelist()


@pytest.mark.slow
def test_installed_wheel_runs_the_pipeline_from_anywhere(wheel, tmp_path):
    bin_, purelib, env = _venv(tmp_path)
    py = bin_ / "python"
    work = tmp_path / "elsewhere"
    work.mkdir()
    _run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--ignore-installed", str(wheel)],
        work,
        env,
    )
    r = _run(
        [
            py,
            "-c",
            "import surf_train; from pathlib import Path; print(Path(surf_train.__file__).resolve()); "
            "print(surf_train.CONF_DIR, surf_train.ASSETS_DIR)",
        ],
        work,
        env,
    )
    pkg = Path(purelib).resolve() / "surf_train"  # the wheel's copy, not the checkout
    assert r.stdout.split() == [str(pkg / "__init__.py"), str(pkg / "_data/conf"), str(pkg / "_data/assets")]

    _run([bin_ / "surf-make-pairs", "num_pairs=4", "steps=4", "switch=2", "progress=false"], work, env)  # toy base
    assert glob.glob(str(work / "data/pairs/logs/*/make_pairs.log"))  # Hydra's job name is the command's
    _run(
        [
            bin_ / "surf-train",
            "trainer.max_steps=2",
            "ckpt_every=2",
            "data.val_samples=0",
            "logger=none",
            "module.decode_base=null",
            "trainer.enable_progress_bar=false",
            "data.batch_size=2",
        ],
        work,
        env,
    )
    _run([bin_ / "surf-export", "runs/tiny/checkpoints/last.ckpt", "runs/tiny/refiner"], work, env)
    r = _run([bin_ / "surf-generate", "--steps", "4", "--switch", "2", "--no-progress"], work, env)
    assert "surf: outputs/generate/surf_p000_s0_a-red-circle-moving-right-on-a-gray.mp4" in r.stdout
    assert (work / "outputs/generate/surf_p000_s0_a-red-circle-moving-right-on-a-gray.mp4").is_file()
    for script in ("surf-make-video-pairs", "surf-evaluate", "surf-flops"):
        assert _run([bin_ / script, "--help"], work, env).stdout.strip()


def test_editable_install_reads_the_checkout(tmp_path):
    """`pip install -e` (make venv): conf/ and assets/ are read where they are, and the console scripts work."""
    src = _copy_tree(tmp_path)
    bin_, _, env = _venv(tmp_path)
    _run(
        [
            bin_ / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--ignore-installed",
            "-e",
            str(src),
        ],
        tmp_path,
        env,
    )
    r = _run(
        [bin_ / "python", "-c", "import surf_train; print(surf_train.CONF_DIR, surf_train.ASSETS_DIR)"], tmp_path, env
    )
    assert r.stdout.split() == [str(src.resolve() / "conf"), str(src.resolve() / "assets")]
    assert not (src / "surf_train/_data").exists()  # nothing copied into the checkout
    assert "make_pairs: write (preview, target)" in _run([bin_ / "surf-make-pairs", "--help"], tmp_path, env).stdout
