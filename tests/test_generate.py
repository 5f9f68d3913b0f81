import json
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from surf_train.common.errors import ConfigError
from surf_train.generate import GenerateConfig, generate, parse_args
from surf_train.models.refiner import Refiner, RefinerConfig
from surf_train.training.export import save_refiner

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(
    base="tiny", height=64, width=64, frames=9, prefix_height=64, prefix_width=64, steps=4, switch=1, progress=False
)


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    """An exported tiny Refiner with random (non-zero) output weights."""
    torch.manual_seed(0)
    net = Refiner.from_cfg(RefinerConfig(dim=32, depth=2, heads=2, text_dim=32))
    torch.nn.init.normal_(net.proj_out.weight, std=0.02)
    return save_refiner(
        net.state_dict(),
        net.cfg,
        tmp_path_factory.mktemp("ref") / "refiner",
        bridge={"steps": 3, "sigma_aug_eval": 0.05},
    )


def read_video(path):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return frames


@pytest.mark.parametrize("mode", ["surf", "baseline", "preview"])
def test_every_mode_writes_a_playable_video_and_a_report(mode, refiner_dir, tmp_path):
    reps = generate(
        GenerateConfig(
            **SMALL, mode=mode, refiner=str(refiner_dir), out_dir=str(tmp_path), prompts=["a cat", "a dog"], seeds=[3]
        )
    )
    assert len(reps) == 2
    for r in reps:
        frames = read_video(r["video"])
        assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
        assert json.loads(Path(r["video"]).with_suffix(".json").read_text()) == r
        want = {
            "surf": {"prefix", "low_res", "refine", "decode"},
            "baseline": {"full_res", "decode"},
            "preview": {"prefix", "low_res", "decode"},
        }[mode]
        assert want <= set(r["seconds"]) and all(v >= 0 for v in r["seconds"].values())
        assert r["seed"] == 3 and r["settings"]["steps"] == 4 and r["frames"] == 9
        calls = r["calls"]
        # pool (the default rule) needs no velocity at the switch: switch=1 prefix call, 3 at the preview size
        assert calls == ({"full_res": 4} if mode == "baseline" else {"prefix": 1, "low_res": 3})
        assert r["refiner_steps"] == (3 if mode == "surf" else 0)
        assert set(r["flops"]) >= {"total"} and r["flops"]["total"] > 0


def test_surf_differs_from_preview_and_is_seeded(refiner_dir, tmp_path):
    kw = dict(**SMALL, refiner=str(refiner_dir), prompts=["a cat"], seeds=[1])
    a = generate(GenerateConfig(**kw, mode="surf", out_dir=str(tmp_path / "a")))[0]
    b = generate(GenerateConfig(**kw, mode="surf", out_dir=str(tmp_path / "b")))[0]
    c = generate(GenerateConfig(**kw, mode="preview", out_dir=str(tmp_path / "c")))[0]
    va, vb, vc = (torch.tensor(read_video(r["video"])[4]).float() for r in (a, b, c))
    assert torch.equal(va, vb)
    assert (va - vc).abs().mean() > 0.5


def test_slim_import_and_run(refiner_dir, tmp_path):
    code = (
        "import sys; from surf_train.generate import main; "
        f"main(['--base', 'tiny', '--refiner', {str(refiner_dir)!r}, '--height', '64', '--width', '64', "
        f"'--frames', '5', '--prefix-height', '64', '--prefix-width', '64', '--steps', '2', '--switch', '1', "
        f"'--out', {str(tmp_path)!r}, '--no-progress']); "
        "print('LOADED', [m for m in ('lightning', 'pytorch_lightning', 'deepspeed', 'hydra', 'wandb') "
        "if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LOADED []" in r.stdout and "surf:" in r.stdout


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(refiner="/nope"), "not an exported Refiner"),
        (dict(height=60), "--height 60 must be a positive multiple"),
        (dict(preview_height=128), "larger than target"),
        (dict(switch=9), "--switch 9"),
        (dict(mode="fast"), "--mode 'fast'"),
        (dict(base="sd15"), "unknown base model 'sd15'"),
        (dict(frames=0), "--frames 0 must be >= 1"),
        (dict(preview_width=0), "--preview-width 0 must be >= 1"),
    ],
)
def test_bad_input(kw, msg, refiner_dir, tmp_path):
    args = {**SMALL, "refiner": str(refiner_dir), "out_dir": str(tmp_path), **kw}
    with pytest.raises(ConfigError, match=msg):
        generate(GenerateConfig(**args))


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="prompts file not found"):
        parse_args(["--prompts", str(tmp_path / "none.txt")])
    r = subprocess.run(
        [sys.executable, "-m", "surf_train.generate", "--refiner", str(tmp_path / "x"), "--base", "tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_loading_the_refiner_prints_no_dtype_warning(refiner_dir, tmp_path):
    import logging

    from diffusers.utils import logging as diffusers_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        generate(
            GenerateConfig(
                **SMALL, mode="surf", refiner=str(refiner_dir), out_dir=str(tmp_path), prompts=["a cat"], seeds=[0]
            )
        )
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert not [r for r in records if "kept in float32" in r.getMessage()]  # diffusers' warning on Refiner.to(dtype)


def test_acceleration_flags_reach_the_report(tmp_path):
    """--cfg-stop 2 --cache-threshold: the report counts the forwards made and the blocks the cache skipped."""
    cfg = parse_args(
        [
            "--base",
            "tiny",
            "--mode",
            "preview",
            "--height",
            "64",
            "--width",
            "64",
            "--frames",
            "9",
            "--prefix-height",
            "64",
            "--prefix-width",
            "64",
            "--steps",
            "4",
            "--switch",
            "1",
            "--cfg-stop",
            "2",
            "--cache-threshold",
            "0.5",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    plain, fast = (
        generate(GenerateConfig(**{**SMALL, "mode": "preview", "out_dir": str(tmp_path / n), **kw}))[0]
        for n, kw in (("plain", {}), ("fast", {"cfg_stop": cfg.cfg_stop, "cache_threshold": cfg.cache_threshold}))
    )
    # prefix: step 0 (CFG: 2 forwards); preview: step 1 with CFG, steps 2 and 3 without
    assert plain["forwards"] == {"prefix": 2, "low_res": 6} and fast["forwards"] == {"prefix": 2, "low_res": 4}
    assert plain["blocks_run"]["low_res"] == 1.0 and fast["blocks_run"]["low_res"] < 1.0
    assert sum(fast["flops"].values()) < sum(plain["flops"].values())


def test_video_names_carry_the_prompt_and_a_second_run_never_overwrites(tmp_path):
    """Issue 24: names were <mode>_p<i>_s<seed>.mp4 whatever the prompt, so a second run replaced the first."""
    from surf_train.generate import slug

    assert slug("A red ball, rolling!") == "a-red-ball-rolling" and slug("Café crème") == "cafe-creme"
    assert slug("word " * 20) == "word-word-word-word-word-word-word-word" and slug("!!!") == "prompt"
    cfg = dict(SMALL, mode="preview", steps=2, frames=5, out_dir=str(tmp_path), seeds=[0])
    first = generate(GenerateConfig(**cfg, prompts=["a cat playing piano", "a red ball rolling"]))
    names = [Path(r["video"]).name for r in first]
    assert names == ["preview_p000_s0_a-cat-playing-piano.mp4", "preview_p001_s0_a-red-ball-rolling.mp4"]
    before = {n: (tmp_path / n).read_bytes() for n in names}
    (second,) = generate(GenerateConfig(**cfg, prompts=["a cat playing piano"]))
    assert Path(second["video"]).name == "preview_p000_s0_a-cat-playing-piano-2.mp4"
    assert json.loads(Path(second["video"]).with_suffix(".json").read_text())["video"] == second["video"]
    assert {n: (tmp_path / n).read_bytes() for n in names} == before  # the first run's videos are untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_compile_flag_compiles_the_repeated_blocks_of_base_and_refiner(refiner_dir):
    """--compile: every repeated block of the base transformer and of the Refiner is wrapped by torch.compile
    (compiled lazily at its first call; the outputs are checked in test_pipeline_diffusers)."""
    from surf_train.generate import load_pipeline

    cfg = parse_args(["--base", "tiny", "--refiner", str(refiner_dir), "--compile"])
    assert cfg.compile and not parse_args(["--base", "tiny"]).compile
    pipe = load_pipeline(cfg)
    for m in (pipe.transformer, pipe.refiner):
        blocks = [b for b in m.modules() if type(b).__name__ in m._repeated_blocks]
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
