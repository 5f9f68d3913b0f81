"""Honest stops (SIGTERM, SIGINT), a full disk, a GPU trainer without a GPU, and the demo defaults of
make_video_pairs with data=mixed (issue 24)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import lightning.pytorch as pl
import pytest
import torch
from test_train import FAST, ROOT, SHRINK, compose_cfg

import surf_train.training.train as train_mod
from surf_train.common.errors import ConfigError
from surf_train.training.checkpoint import checkpoint_step, tensor_bytes
from surf_train.training.train import train


def _args(pairs, run_dir, *extra):
    return [f"data.shards={pairs}", f"run_dir={run_dir}", "ckpt_every=4", "data.val_samples=2", *FAST, *SHRINK, *extra]


def _wait_for(path, text, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} (exit {proc.poll()}):\n{path.read_text()[-3000:]}")


def stopped_run(pairs, run_dir, signum, launched) -> tuple[int, str]:
    """`python -m surf_train` for many steps, sent `signum` once step 6 is printed: (exit code, output)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    args = _args(pairs, run_dir, "progress_every=1", "trainer.max_steps=100000")
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "surf_train", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    launched.append(p)
    _wait_for(log, "[surf_train] step 6/", p)
    p.send_signal(signum)
    return p.wait(timeout=120), log.read_text()


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143)])  # SIGINT: tests/test_run_lock.py
def test_a_signal_saves_marks_the_summary_and_exits_128_plus_signal(pairs, tmp_path, launched, signum, code):
    """Outside SLURM: the step after the signal is saved (not only the last multiple of ckpt_every), the
    summary says stopped, one line says so, the exit code is 128 + signal; the same command resumes there.
    (SIGINT, exit 130: the two-launch test of tests/test_run_lock.py ends its first run with it.)"""
    run = tmp_path / "run"
    rc, out = stopped_run(pairs, run, signum, launched)
    name = signal.Signals(signum).name
    assert rc == code, out[-3000:]
    s = json.loads((run / "summary.json").read_text())
    last = run / "checkpoints" / "last.ckpt"
    assert s["stopped"] == name and s["steps"] >= 6 and checkpoint_step(last) == s["steps"]
    assert s["checkpoint"] == str(last.resolve()) and s["val_mse_refiner"] is None  # no final validation
    stop_lines = [ln for ln in out.splitlines() if "stopped by" in ln]
    assert stop_lines == [
        f"[surf_train] stopped by {name} at step {s['steps']}: checkpoint {last.resolve()}, the same command "
        f"resumes from it; summary: {run / 'summary.json'}"
    ]
    assert "Traceback" not in out and "Received SIGTERM" not in out and "KeyboardInterrupt" not in out
    assert not list(run.rglob("*.tmp")) and not (run / "train.lock").exists()
    if signum == signal.SIGTERM:
        again = train(compose_cfg(_args(pairs, run, f"trainer.max_steps={s['steps'] + 2}")))
        assert again["resumed_from"] == str(last) and again["steps"] == s["steps"] + 2 and "stopped" not in again
        # the stop's checkpoint was the one kept (top 1): replaced, not left behind
        assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", f"step{s['steps'] + 2:08d}.ckpt"]


class SignalAt(pl.Callback):
    """Sends this process `signum` at the end of step `step` (or at the end of training: step None)."""

    def __init__(self, signum, step):
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_end(self, trainer, pl_module):
        if self.step is None:
            os.kill(os.getpid(), self.signum)


def _with_callback(monkeypatch, cb):
    make = train_mod._trainer

    def trainer_with(*a, **kw):
        t = make(*a, **kw)
        t.callbacks.insert(0, cb)  # before StopOnSignal, which the run appends
        return t

    monkeypatch.setattr(train_mod, "_trainer", trainer_with)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_in_process_stop_at_the_batch_boundary_restores_the_handlers(pairs, tmp_path, monkeypatch, signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _with_callback(monkeypatch, SignalAt(signum, 3))
    s = train(compose_cfg(_args(pairs, tmp_path, "trainer.max_steps=50")))
    assert s["stopped"] == signal.Signals(signum).name and s["steps"] == 3
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step00000003.ckpt"]
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_signal_after_the_last_batch_boundary_still_saves_and_marks(pairs, tmp_path, monkeypatch):
    """SIGTERM while fit ends (after the last step's boundary): the final step is saved, no validation."""
    _with_callback(monkeypatch, SignalAt(signal.SIGTERM, None))
    s = train(compose_cfg(_args(pairs, tmp_path, "trainer.max_steps=5")))
    assert s["stopped"] == "SIGTERM" and s["steps"] == 5 and s["val_mse_refiner"] is None
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step00000005.ckpt"]


def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_at_a_checkpoint_is_one_line_and_leaves_no_tmp(pairs, tmp_path, monkeypatch):
    """ENOSPC at the checkpoint's fsync (where a full disk can first show): one ConfigError naming the file,
    the checkpoint's size and the free space; its temporary file removed; a rerun with room trains on."""
    import surf_train.training.checkpoint as ck

    monkeypatch.setattr(ck.os, "fsync", _enospc)
    cfg = _args(pairs, tmp_path, "trainer.max_steps=4", "data.val_samples=0")
    with pytest.raises(ConfigError) as e:
        train(compose_cfg(cfg))
    ckpts = tmp_path / "checkpoints"
    assert re.fullmatch(
        rf"cannot write checkpoint {ckpts / 'step00000004.ckpt'}: No space left on device \(needs about 0\.7 MB, "
        rf"[\d.]+ [MG]B free on {ckpts}\); free space there or set run_dir on a larger disk",
        str(e.value),
    ), str(e.value)
    assert not list(tmp_path.rglob("*.tmp")) and not list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert not (tmp_path / "train.lock").exists()
    monkeypatch.undo()
    assert train(compose_cfg(cfg))["steps"] == 4


def test_checkpoint_size_estimate_matches_the_file(pairs, tmp_path):
    train(compose_cfg(_args(pairs, tmp_path, "trainer.max_steps=4", "data.val_samples=0")))
    f = tmp_path / "checkpoints" / "step00000004.ckpt"
    est = tensor_bytes(torch.load(f, weights_only=True))
    assert 1.0 <= est / f.stat().st_size < 1.15  # a little over: the free space a save needs


def _unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow  # two trainings in subprocesses (~25 s); the in-process ENOSPC test above covers the logic
@pytest.mark.skipif(not _unshare_ok(), reason="cannot mount a tmpfs in a user namespace here")
def test_real_full_disk_and_a_tiny_tmpdir(pairs, tmp_path):
    """In a mount namespace: a 64 kB $TMPDIR does not fail the saves (they go straight to run_dir), and a
    run_dir on a 256 kB tmpfs (the 0.7 MB checkpoint does not fit) exits 2 with one line and no .tmp."""
    small, tmpdir = tmp_path / "small", tmp_path / "tmpdir"
    small.mkdir(), tmpdir.mkdir()
    cmd = " ".join(["'" + a + "'" for a in [sys.executable, "-m", "surf_train"]])
    a = " ".join(f"'{x}'" for x in _args(pairs, "RUN", "trainer.max_steps=4", "data.val_samples=0"))
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {tmpdir} && mount -t tmpfs -o size=256k tmpfs {small} && "
        f"TMPDIR={tmpdir} {cmd} {a.replace('RUN', str(tmp_path / 'ok'))} > {tmp_path}/ok.log 2>&1; echo $? > "
        f"{tmp_path}/ok.rc; {cmd} {a.replace('RUN', str(small / 'run'))} > {tmp_path}/full.log 2>&1; "
        f"echo $? > {tmp_path}/full.rc; find {small} > {tmp_path}/full.files"
    )
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, timeout=300, check=True)
    ok, full = (tmp_path / "ok.log").read_text(), (tmp_path / "full.log").read_text()
    assert (tmp_path / "ok.rc").read_text().strip() == "0", ok[-2000:]
    assert checkpoint_step(tmp_path / "ok" / "checkpoints" / "last.ckpt") == 4
    assert (tmp_path / "full.rc").read_text().strip() == "2", full[-2000:]
    errors = [ln for ln in full.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in full, full[-2000:]
    assert errors[0].startswith(f"error: cannot write checkpoint {small / 'run' / 'checkpoints' / 'step00000004.ckpt'}")
    assert "No space left on device (needs about 0.7 MB" in errors[0]
    assert not [f for f in (tmp_path / "full.files").read_text().split() if f.endswith(".tmp")]


def test_gpu_trainer_without_a_gpu_is_refused_before_the_model_is_built(pairs, tmp_path, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("the data and model were read before the accelerator check")

    monkeypatch.setattr(train_mod, "_data_and_module", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg(["+experiment=hunyuan", f"data.shards={pairs}", f"run_dir={tmp_path}", "logger=none"])
    with pytest.raises(
        ConfigError, match=r"^trainer.accelerator=gpu: this torch \(.*\) sees no CUDA GPU; run on a GPU"
    ):
        train(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="^trainer.devices=4: this node has 2 CUDA GPU"):
        train(compose_cfg(["+experiment=hunyuan", f"run_dir={tmp_path}", "trainer.devices=4"]))
    assert not (tmp_path / "checkpoints").exists()


def test_make_video_pairs_defaults_train_with_data_mixed(tmp_path):
    """The no-argument make_video_pairs (its demo videos) writes 2 shards, so data=mixed, which holds out
    the last shard of every source, trains on them; the generated source here: 2 shards with the same base."""
    from surf_train.base import BaseSpec
    from surf_train.data.shards import ShardWriter, encode_sample, list_shards, read_shards
    from surf_train.data.video_pairs import VideoPairsConfig, make_video_pairs

    real = tmp_path / "video_pairs"
    make_video_pairs(VideoPairsConfig(base=BaseSpec.from_name("toy"), out_dir=str(real), progress=False))
    assert len(list_shards(real)) == 2
    gen = tmp_path / "pairs"
    with ShardWriter(gen, rank=0, max_count=4) as w:  # same base, shapes and text width: a "generated" copy
        for j, s in enumerate(read_shards(list_shards(real))):
            meta = {k: v for k, v in s["meta"].items() if k not in ("key", "sha256")}
            w.write(encode_sample(f"g{j:04d}", {k: s[k] for k in ("preview", "target", "text")}, meta))
    assert len(list_shards(gen)) == 2
    data = ["data=mixed", f"data.sources.generated.shards={gen}", f"data.sources.real.shards={real}"]
    s = train(compose_cfg([*data, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2", "data.val_samples=2", *FAST]))
    assert s["steps"] == 2 and s["val_mse_refiner"] is not None
