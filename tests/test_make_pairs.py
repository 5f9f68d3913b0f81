import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from surf_train.common.errors import ConfigError
from surf_train.data.meta import base_fingerprint, weights_digest
from surf_train.data.pairs import (
    BUILTIN_PROMPTS,
    PairsConfig,
    check_fingerprint,
    make_jobs,
    make_pairs,
    read_prompts,
)
from surf_train.data.shards import list_shards, lock_path, read_shards, shard_keys

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(height=64, width=64, frames=9, steps=4, switch=1, shard_size=2, progress=False)


def cfg(out, **kw):
    return PairsConfig.from_dict({"base": "tiny", "out_dir": str(out), **SMALL, **kw})


def all_samples(out):
    return list(read_shards(list_shards(out)))


def cli(*args, env=None, **kw):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "data_prep/make_pairs.py"), *args],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        **kw,
    )


def cli_args(out, **kw):
    return ["base=tiny", f"out_dir={out}", *(f"{k}={v}" for k, v in {**SMALL, **kw}.items()), "progress=false"]


def test_end_to_end_count_schema_and_metadata(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    summary = make_pairs(cfg(tmp_path, num_pairs=5, rule="pool"))
    assert summary["pairs"] == 5 and summary["shards"] == 3 and summary["bytes"] > 0
    samples = all_samples(tmp_path)
    assert len(samples) == 5 and len({s["key"] for s in samples}) == 5
    for s in samples:
        assert s["preview"].shape == (16, 3, 4, 4) and s["target"].shape == (16, 3, 8, 8)
        assert s["preview"].dtype == torch.float16 and s["text"].shape == (16, 32)
        assert torch.isfinite(s["preview"].float()).all() and s["target"].float().std() > 0.1
        m = s["meta"]
        assert m["prompt"] in BUILTIN_PROMPTS and isinstance(m["seed"], int)
        assert m["base"]["id"] == "tiny:tiny" and m["target_size"] == [9, 64, 64]
        assert m["preview_size"] == [9, 32, 32] and m["version"]
        assert m["reshift"]["rule"] == "pool" and m["reshift"]["switch"] == 1 and m["schedule"]["steps"] == 4
        assert m["preview_shape"] == [16, 3, 4, 4] and m["source"] == "generated"
    # only safetensors + json entries: decoding never needs pickle
    for shard in list_shards(tmp_path):
        with tarfile.open(shard) as t:
            assert {n.split(".", 1)[1] for n in t.getnames()} == {"tensors.safetensors", "json"}


def test_pair_is_deterministic_under_its_seed(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    make_pairs(cfg(tmp_path / "a", num_pairs=2))
    make_pairs(cfg(tmp_path / "b", num_pairs=2))
    a = {s["key"]: s for s in all_samples(tmp_path / "a")}
    b = {s["key"]: s for s in all_samples(tmp_path / "b")}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k]["target"], b[k]["target"]) and torch.equal(a[k]["preview"], b[k]["preview"])


def test_rerun_skips_done_and_extends(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    make_pairs(cfg(tmp_path, num_pairs=3))
    again = make_pairs(cfg(tmp_path, num_pairs=3))
    assert again["pairs"] == 0 and again["skipped"] == 3
    more = make_pairs(cfg(tmp_path, num_pairs=6))
    assert more["pairs"] == 3
    keys = [s["key"] for s in all_samples(tmp_path)]
    assert len(keys) == 6 == len(set(keys))


def test_prompts_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\na dog\n")
    assert read_prompts(str(txt)) == [("a cat", None), ("a dog", None)]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a cat", "seed": 7}\n{"prompt": "a dog"}\n')
    jobs = make_jobs(read_prompts(str(jl)), 4, seed=100)
    assert [(j.prompt, j.seed) for j in jobs] == [("a cat", 7), ("a dog", 101), ("a cat", 8), ("a dog", 103)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        read_prompts(str(bad))


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(prompts="/nope/prompts.txt"), "prompts file not found"),
        (dict(height=60), "target height=60 must be a positive multiple of 16"),
        (dict(preview_width=24), "preview width=24 must be a positive multiple of 16"),
        (dict(frames=8), "target frames=8 must be 4\\*n\\+1"),
        (dict(preview_height=128), "preview 128x32 is larger than target 64x64"),
        (dict(switch=5), "switch=5 must be in \\[0, steps=4\\]"),
        (dict(switch=-1), "switch=-1"),
        (dict(rule="magic"), "rule='magic'"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        make_pairs(cfg(tmp_path, **kw))


def test_unknown_base_and_foreign_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="unknown base model 'sdxl'"):
        PairsConfig.from_dict({"base": "sdxl"})
    make_pairs(cfg(tmp_path, num_pairs=1))
    with pytest.raises(ConfigError, match=r"different configuration \(steps: 4 -> 6\)"):
        make_pairs(cfg(tmp_path, num_pairs=1, steps=6))


def test_retrained_local_base_is_a_different_configuration(tmp_path, monkeypatch):
    """Pairs of a retrained local base (same directory, new weights) are refused, not appended."""
    import dataclasses

    from surf_train.base import BaseSpec

    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "weights.safetensors").write_bytes(b"old weights")
    (model / "model_index.json").write_text("{}")
    spec = dataclasses.replace(BaseSpec.from_name("toy"), pretrained=str(model))
    old = base_fingerprint(spec)
    assert old["weights"] == weights_digest(str(model)) and len(old["weights"]) == 16
    check_fingerprint(tmp_path / "pairs", old)
    check_fingerprint(tmp_path / "pairs", base_fingerprint(spec))  # unchanged weights: appending is fine
    (model / "transformer" / "weights.safetensors").write_bytes(b"new weights")
    with pytest.raises(ConfigError, match=r"different configuration \(weights: '[0-9a-f]{16}' -> '[0-9a-f]{16}'\)"):
        check_fingerprint(tmp_path / "pairs", base_fingerprint(spec))
    # large files are hashed by size and their ends: a change in the first MiB still shows
    monkeypatch.setattr("surf_train.data.meta.WHOLE_FILE", 1000)
    big = bytearray(3 << 20)
    (model / "transformer" / "weights.safetensors").write_bytes(big)
    d = weights_digest(str(model))
    big[10] = 1
    (model / "transformer" / "weights.safetensors").write_bytes(big)
    assert weights_digest(str(model)) != d
    assert weights_digest("Wan-AI/Wan2.1-T2V-14B-Diffusers") is None and weights_digest(None) is None


def test_cli_default_error_message(tmp_path):
    r = cli(*cli_args(tmp_path, switch=9))
    assert r.returncode == 2
    assert "switch=9 must be in [0, steps=4]" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_out_dir_naming_a_file_is_one_clear_error(tmp_path):
    f = tmp_path / "pairs.tar"
    f.write_bytes(b"not a directory")
    with pytest.raises(ConfigError, match=f"out_dir={f} is an existing file, not a directory"):
        make_pairs(cfg(f, num_pairs=1))
    r = cli(*cli_args(f, num_pairs=1))
    out = (r.stderr + r.stdout).strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in out if "out_dir=" in line and "existing file" in line] and len(out) == 1, out
    assert f.read_bytes() == b"not a directory"


@pytest.mark.slow
def test_double_launch_is_refused_and_loses_nothing(tmp_path):
    """A second make_pairs on the same out_dir and rank while the first runs: refused in one line; the first
    finishes with every pair exactly once in complete shards (it used to lose its pairs and leave duplicates)."""
    args = cli_args(tmp_path, num_pairs=96, steps=40, batch_size=1)
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "data_prep/make_pairs.py"), *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lock = lock_path(tmp_path, 0)
    deadline = time.time() + 120  # launch the second once the first is writing a shard
    while time.time() < deadline and not list(tmp_path.glob("pairs-r000-*")) and first.poll() is None:
        time.sleep(0.05)
    second = cli(*args, timeout=300)
    running = first.poll() is None
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out
    shards = list_shards(tmp_path)  # every shard complete, every pair exactly once
    assert all(len(shard_keys(p)) == 2 for p in shards)
    keys = [s["key"] for s in all_samples(tmp_path)]
    assert sorted(keys) == sorted({j.key for j in make_jobs(read_prompts(None), 96, 0)}) and len(shards) == 48
    assert running, "the first run ended before the second was refused: make it longer"
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    errors = [line for line in (second.stderr + second.stdout).splitlines() if "error: " in line]
    assert len(errors) == 1 and f"{lock}: rank 0 of {tmp_path} is being written by pid {first.pid}" in errors[0]
    assert not list(tmp_path.glob("*.tmp")) and not lock.exists()
    again = cli(*args)
    assert again.returncode == 0 and "96 already done, 0 to make" in again.stderr + again.stdout


@pytest.mark.slow
def test_crash_and_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    """kill -9 mid-run (after at least one shard closed), then rerun: every pair exactly once."""
    args = cli_args(tmp_path, num_pairs=16, shard_size=2, steps=12)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "data_prep/make_pairs.py"), *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list_shards(tmp_path):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = list_shards(tmp_path)
    assert 1 <= len(before) < 8, "the run should have been killed part-way"
    for shard in before:  # whatever was left under a .tar name is complete and readable
        assert len(shard_keys(shard)) == 2 and len(list(read_shards([shard]))) == 2
    (tmp_path / "pairs-r000-000099.tar.tmp").write_bytes(b"half a shard")  # a crash's leftover
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"{lock_path(tmp_path, 0)}: taking over the stale lock of pid {proc.pid}" in r.stderr + r.stdout
    assert not list(tmp_path.glob("*.tmp")) and not lock_path(tmp_path, 0).exists()
    keys = [s["key"] for s in all_samples(tmp_path)]
    assert len(keys) == 16 == len(set(keys))
    want = {j.key for j in make_jobs(read_prompts(None), 16, 0)}
    assert set(keys) == want


@pytest.mark.slow
def test_two_ranks_cover_every_sample_once(tmp_path):
    args = cli_args(tmp_path, num_pairs=7)
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "data_prep/make_pairs.py"), *args],
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "SLURM_PROCID": str(r), "SLURM_NTASKS": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    by_rank = {r: sum(len(shard_keys(s)) for s in tmp_path.glob(f"pairs-r{r:03d}-*.tar")) for r in range(2)}
    assert by_rank == {0: 4, 1: 3}
    keys = [s["key"] for s in all_samples(tmp_path)]
    assert len(keys) == 7 == len(set(keys))
    assert "rank 1/2: 3 pairs assigned" in outs[1]


def test_sample_bytes_matches_real_tiny_shards(pairs):
    """shards.sample_bytes (the README's bytes-per-pair table) against the shards make_pairs wrote."""
    from surf_train.data.shards import sample_bytes

    for shard in list_shards(pairs):
        got = list(read_shards([shard]))
        entries = sum(
            sample_bytes(
                tuple(s["preview"].shape),
                tuple(s["target"].shape),
                tuple(s["text"].shape),
                s["preview"].dtype,
                s["meta"],
            )
            for s in got
        )
        assert shard.stat().st_size == -(-(entries + 1024) // 10240) * 10240  # + end marker, 10 KiB records


def test_acceleration_plug_ins_skip_work_and_change_the_fingerprint(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    plain = make_pairs(cfg(tmp_path / "plain", num_pairs=2, batch_size=2, steps=6, switch=2))
    fast = make_pairs(
        cfg(tmp_path / "fast", num_pairs=2, batch_size=2, steps=6, switch=2, cache_threshold=0.5, cfg_low=False)
    )
    # 2 pairs x (2 shared + 4 high + 4 low steps) x 2 CFG branches; without CFG in the 4 low steps, 8 fewer
    assert plain["forwards"] == 2 * 10 * 2 and fast["forwards"] == plain["forwards"] - 2 * 4
    assert plain["blocks_run"] == 1.0 and fast["blocks_run"] < 0.9
    with pytest.raises(ConfigError, match="acceleration|fingerprint|different"):
        make_pairs(cfg(tmp_path / "fast", num_pairs=4, batch_size=2, steps=6, switch=2))
