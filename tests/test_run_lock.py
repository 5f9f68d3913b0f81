"""One training per run directory: run_dir/train.lock (surf_train.common.lock.DirLock), held by the launch's
first process only."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from test_stops import _args, _wait_for
from test_train import ROOT, compose_cfg

from surf_train.common.dist_env import first_process
from surf_train.common.errors import ConfigError
from surf_train.common.lock import DirLock
from surf_train.training.train import run_lock, train


def test_a_second_launch_on_a_live_run_dir_is_one_line(pairs, tmp_path, launched):
    """Two launches on one run_dir: the second exits 2 with one line naming the lock, host and pid, and
    trains nothing; the first trains on (and, sent SIGINT, saves and exits 130)."""
    run, log = tmp_path / "run", tmp_path / "first.log"
    args = ["-m", "surf_train", *_args(pairs, run, "progress_every=1", "trainer.max_steps=100000")]
    with open(log, "w") as f:
        first = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    launched.append(first)
    _wait_for(log, "[surf_train] step 2/", first)
    owner = json.loads((run / "train.lock").read_text())
    assert (owner["pid"], owner["host"]) == (first.pid, socket.gethostname())
    second = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert [ln for ln in second.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: {run / 'train.lock'}: run_dir {run} is being trained by pid {first.pid} on {socket.gethostname()}; "
        f"wait for it to finish (or, if that process is gone, delete the lock file)"
    ]
    assert first.poll() is None and json.loads((run / "train.lock").read_text())["pid"] == first.pid
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130, log.read_text()[-2000:]
    assert json.loads((run / "summary.json").read_text())["stopped"] == "SIGINT"
    assert not (run / "train.lock").exists()


def test_a_dead_owners_lock_is_taken_over_with_one_warning(pairs, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "train.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    with caplog.at_level("WARNING"):
        s = train(compose_cfg(_args(pairs, tmp_path, "trainer.max_steps=2", "data.val_samples=0")))
    assert s["steps"] == 2 and not lock.exists()
    warnings = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert warnings == [
        f"{lock}: taking over the stale lock of pid {dead.pid} on {socket.gethostname()} (no longer running)"
    ]


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch, caplog):
    """A requeued job starts on another node: the old owner cannot be checked from here, but the lock names
    the same SLURM job, so it is gone. Another job's lock from another node is refused, and so is a live
    process of the same job on this node (two job steps on one run_dir)."""
    lock = tmp_path / "train.lock"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock.write_text(json.dumps({"host": "node-a", "pid": 12345, "slurm_job": "4242"}))
    with caplog.at_level("WARNING"), DirLock(lock, "busy", "run_dir"):
        assert json.loads(lock.read_text())["slurm_job"] == "4242"
    assert (
        f"{lock}: taking over the stale lock of pid 12345 on node-a (an earlier run of SLURM job 4242, requeued)"
        in (caplog.text)
    )
    lock.write_text(json.dumps({"host": "node-a", "pid": 12345, "slurm_job": "4241"}))
    with pytest.raises(ConfigError, match=f"^{lock}: busy by pid 12345 on node-a; wait for it"):
        DirLock(lock, "busy", "run_dir").acquire()
    live = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": "4242"}
    lock.write_text(json.dumps(live))
    with pytest.raises(ConfigError, match="busy by pid"):
        DirLock(lock, "busy", "run_dir").acquire()


@pytest.mark.parametrize(
    "env,first",
    [
        ({}, True),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, True),  # torchrun rank 0
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, False),
        ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, False),  # torchrun, node 1
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}, False),
        ({"WORLD_SIZE": "2", "NODE_RANK": "0", "LOCAL_RANK": "1"}, False),  # Lightning's own launcher's child
        ({"WORLD_SIZE": "4", "NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
    ],
)
def test_only_the_first_process_of_a_launch_holds_the_lock(tmp_path, monkeypatch, env, first):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert first_process() is first
    lock = run_lock(tmp_path)
    assert (lock is not None) is first and (tmp_path / "train.lock").exists() is first
    if lock is not None:
        lock.release()
