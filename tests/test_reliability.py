"""Reruns, unreadable checkpoints, the float32 EMA, plain progress lines and requeue checkpoint pruning."""

import json
import subprocess
import sys

import pytest
import torch
from test_train import FAST, ROOT, SHRINK, compose_cfg

from surf_train.common.errors import ConfigError
from surf_train.training.checkpoint import hpc_checkpoints, prune_hpc_checkpoints, resume_checkpoint
from surf_train.training.train import train


def _base(pairs, run_dir):
    return [f"data.shards={pairs}", f"run_dir={run_dir}", "ckpt_every=2", "data.val_samples=2", *FAST, *SHRINK]


def test_rerun_of_a_finished_run_reports_its_summary(pairs, tmp_path, capsys):
    first = train(compose_cfg(_base(pairs, tmp_path) + ["trainer.max_steps=3"]))
    capsys.readouterr()
    again = train(compose_cfg(_base(pairs, tmp_path) + ["trainer.max_steps=3"]))  # used to crash in the summary
    out = capsys.readouterr().out
    assert again["steps"] == 3 and again["resumed_from"].endswith("last.ckpt")
    assert (
        again["train_loss_first"] == first["train_loss_first"] and again["train_loss_last"] == first["train_loss_last"]
    )
    assert "[surf_train] 3 steps, train loss" in out
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


def test_truncated_last_checkpoint_falls_back_to_an_older_one(pairs, tmp_path, caplog):
    cfg = _base(pairs, tmp_path) + ["data.val_samples=0", "trainer.max_steps=4"]
    train(compose_cfg(cfg + ["ckpt_every=2", "trainer.max_steps=2"]))
    ckpts = tmp_path / "checkpoints"
    keep = ckpts / "step00000002.ckpt"
    old = tmp_path / "old_step2.ckpt"
    old.write_bytes(keep.read_bytes())
    train(compose_cfg(cfg))
    newest = (ckpts / "last.ckpt").resolve()
    assert newest.name == "step00000004.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a torn copy, e.g. a full disk
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(old.read_bytes())  # an older, complete requeue checkpoint at step 2
    import os

    os.utime(hpc, (newest.stat().st_mtime - 60,) * 2)
    found = resume_checkpoint(tmp_path)
    assert found == (hpc, 2)
    assert "unreadable" in caplog.text and "resuming from the older" in caplog.text
    s = train(compose_cfg(cfg + ["trainer.max_steps=6"]))
    assert s["steps"] == 6 and s["resumed_from"] == str(hpc)


def test_foreign_last_checkpoint_with_nothing_older_is_one_clear_error(pairs, tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / "step00000002.ckpt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    (d / "last.ckpt").symlink_to("step00000002.ckpt")
    with pytest.raises(ConfigError, match="none of its 1 checkpoint.*resume=false"):
        resume_checkpoint(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "surf_train", *_base(pairs, tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "resume=false" in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_ema_stays_float32_under_bf16_mixed_deepspeed(pairs, tmp_path):
    """DeepSpeed casts its module to bf16; an EMA with decay 0.9999 must still move (it cannot in bf16)."""
    from surf_train.training.checkpoint import read_checkpoint

    cfg = compose_cfg(
        _base(pairs, tmp_path)
        + [
            "trainer=deepspeed",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.precision=bf16-mixed",
            "module.ema_decay=0.9999",
            "trainer.max_steps=4",
            "data.val_samples=0",
        ]
    )
    s = train(cfg)
    assert s["steps"] == 4
    state, _, step = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert step == 4
    net = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    ema = {k[11:]: v for k, v in state.items() if k.startswith("ema.module.")}
    assert set(ema) == set(net) and all(v.dtype == torch.float32 for v in ema.values())
    assert any(v.dtype == torch.bfloat16 for v in net.values())  # the engine's module really is bf16
    # after the first (copying) update the EMA moves by 1e-4 of (net - ema) per step: far below bf16's step
    moved = [(ema[k] - net[k].float()).abs().max() for k in net if net[k].dtype == torch.bfloat16]
    assert max(moved) > 0
    # a ZeRO checkpoint directory is resumable (its optimizer shards hold DeepSpeed classes that weights_only
    # refuses); a truncated optimizer shard (a kill mid-save) is not, and the rerun falls back to an older one
    from surf_train.training.checkpoint import _unreadable

    last = (tmp_path / "checkpoints" / "last.ckpt").resolve()
    assert last.is_dir() and _unreadable(last) is None
    shard = next((last / "checkpoint").glob("*zero_pp_rank_0_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "zero_pp_rank_0" in _unreadable(last)


def test_ema_checkpoint_round_trip_and_old_format(tmp_path):
    from surf_train.training.module import RefinerModule

    m = RefinerModule(
        model={
            "preset": "tiny",
            "dim": 32,
            "depth": 2,
            "heads": 2,
            "text_dim": 32,
            "window": [2, 4, 4],
            "mlp_ratio": 2.0,
        },
        ema_decay=0.5,
    )
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(1.0)
    m.ema.update(m.net)
    m.ema.update(m.net)
    ck = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ck)
    assert not any(k.startswith("ema.") for k in ck["state_dict"]) and ck["ema"]["updates"] == 2
    m2 = RefinerModule(model=m.hparams.model, ema_decay=0.5)
    m2.on_load_checkpoint(ck)
    for a, b in zip(m.ema.module.parameters(), m2.ema.module.parameters()):
        assert torch.equal(a, b)
    # the format of earlier versions: EMA as ema.module.* entries of the state dict
    old = {
        "state_dict": {
            **m.net.state_dict(prefix="net."),
            **m.ema.module.state_dict(prefix="ema.module."),
            "ema.n_averaged": torch.tensor(2),
        }
    }
    m3 = RefinerModule(model=m.hparams.model, ema_decay=0.5)
    m3.on_load_checkpoint(old)
    assert not any(k.startswith("ema.") for k in old["state_dict"]) and m3.ema.updates == 2
    for a, b in zip(m.ema.module.parameters(), m3.ema.module.parameters()):
        assert torch.equal(a, b)


def test_plain_progress_lines_when_stdout_is_a_file(pairs, tmp_path):
    log = tmp_path / "slurm-1.out"
    with open(log, "w") as f:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "surf_train",
                *_base(pairs, tmp_path / "run"),
                "trainer.max_steps=12",
                "progress_every=4",
                "trainer.enable_progress_bar=true",
            ],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert r.returncode == 0, text[-2000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("[surf_train] step ")]
    assert [ln.split()[2] for ln in lines] == ["4/12", "8/12", "12/12"]
    assert all("loss " in ln and "samples/s" in ln and "ETA" in ln for ln in lines)
    assert "\r" not in text  # no progress bar redraws in a log file


def test_hpc_pruning_keeps_the_newest_and_the_resume_checkpoint(tmp_path):
    for n in (1, 2, 3, 10):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"x")
    (tmp_path / "hpc_ckpt_4.ckpt").mkdir()  # a ZeRO checkpoint directory
    assert [p.name for p in hpc_checkpoints(tmp_path)] == [f"hpc_ckpt_{n}.ckpt" for n in (1, 2, 3, 4, 10)]
    gone = prune_hpc_checkpoints(tmp_path, keep=2, protect=tmp_path / "hpc_ckpt_1.ckpt")
    assert sorted(p.name for p in gone) == ["hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt"]
    assert [p.name for p in hpc_checkpoints(tmp_path)] == ["hpc_ckpt_1.ckpt", "hpc_ckpt_4.ckpt", "hpc_ckpt_10.ckpt"]


# --- export never deletes what it did not write; the base model travels with the export ----------------


@pytest.fixture(scope="module")
def run_ckpt(pairs, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(
        compose_cfg(
            [
                f"data.shards={pairs}",
                f"run_dir={run}",
                "trainer.max_steps=2",
                "ckpt_every=2",
                "data.val_samples=0",
                *SHRINK,
                *FAST,
            ]
        )
    )
    return run


def test_export_refuses_a_directory_it_did_not_write(run_ckpt, tmp_path):
    from surf_train.training.export import export

    ckpt = run_ckpt / "checkpoints" / "last.ckpt"
    before = sorted(p.relative_to(run_ckpt) for p in run_ckpt.rglob("*"))
    r = subprocess.run(
        [sys.executable, "-m", "surf_train.export", str(ckpt), str(run_ckpt)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "not an exported Refiner" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.relative_to(run_ckpt) for p in run_ckpt.rglob("*")) == before  # the run is intact
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        export(ckpt, f)
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no .tmp left
    out = export(ckpt, tmp_path / "ref")  # new directory
    first = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    export(ckpt, out)  # an earlier export is replaced
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ref"]
    (out / "notes.txt").write_text("user file")  # no longer only our files: refused
    with pytest.raises(ConfigError, match="refusing"):
        export(ckpt, out)
    assert (out / "notes.txt").exists()


def test_export_records_the_base_model_and_generate_refuses_another(run_ckpt, tmp_path):
    from surf_train.generate import GenerateConfig, generate
    from surf_train.training.export import export

    out = export(run_ckpt / "checkpoints" / "last.ckpt", tmp_path / "ref")
    meta = json.loads((out / "surf.json").read_text())
    rec = meta["trained_on"]
    assert rec["base"]["name"] == "tiny" and rec["base"]["family"] == "wan" and rec["latent_channels"] == 16
    assert rec["target_latent"] == [3, 8, 8] and rec["preview_latent"] == [3, 4, 4]
    # hunyuan_video has 16 latent channels too: only the record tells them apart (checked before any download)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "surf_train.generate",
            "--base",
            "hunyuan_video",
            "--refiner",
            str(out),
            "--out",
            str(tmp_path / "gen"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "trained on base model 'tiny'" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(ConfigError, match="16-channel latents but base model toy has 12"):
        generate(GenerateConfig(base="toy", refiner=str(out), out_dir=str(tmp_path / "gen"), progress=False))


@pytest.mark.parametrize(
    "args, msg", [(["--steps", "0"], "--steps 0"), (["--refiner-steps", "0"], "--refiner-steps 0")]
)
def test_generate_zero_steps_is_one_clear_error(args, msg, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "surf_train.generate", "--base", "tiny", *args, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_prefix_defaults_to_the_target_aspect_at_the_native_pixel_count(caplog):
    from surf_train.base import BaseSpec
    from surf_train.generate import GenerateConfig, _sizes, default_prefix

    assert default_prefix((32, 32), (32, 32), 4) == (32, 32)
    assert default_prefix((32, 64), (32, 32), 4) == (24, 44)  # 2:1 at about 32*32 pixels
    assert default_prefix((720, 1280), (480, 832), 16) == (480, 848)  # Wan 480p native, exact 16:9 target
    spec = BaseSpec.from_name("toy")
    assert _sizes(GenerateConfig(base="toy", height=32, width=64), spec)["prefix"] == (24, 44)
    assert "smaller than the preview" not in caplog.text
    _sizes(GenerateConfig(base="toy", height=96, width=96), spec)  # preview 48x48 > the 32x32 prefix
    assert "smaller than the preview" in caplog.text
