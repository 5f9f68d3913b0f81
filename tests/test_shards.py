import io
import json
import os
import tarfile

import pytest
import torch

from surf_train.errors import ConfigError
from surf_train.shards import (OutDirLock, ShardError, ShardWriter, decode_sample, encode_sample, list_shards,
                               lock_path, next_index, read_shards, remove_partial, shard_keys)


def sample(i, dtype=torch.float16):
    return encode_sample(f"k{i:04d}", {"preview": torch.full((4, 1, 2, 2), float(i), dtype=dtype),
                                      "target": torch.full((4, 1, 4, 4), float(i), dtype=dtype)},
                         {"source": "generated", "prompt": f"p{i}"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_keeps_dtype_and_values(tmp_path, dtype):
    with ShardWriter(tmp_path, rank=0, max_count=2) as w:
        for i in range(5):
            w.write(sample(i, dtype))
    assert [p.name for p in list_shards(tmp_path)] == [f"pairs-r000-00000{i}.tar" for i in range(3)]
    got = list(read_shards(list_shards(tmp_path)))
    assert [s["key"] for s in got] == [f"k{i:04d}" for i in range(5)]
    assert all(s["preview"].dtype == dtype and float(s["target"][0, 0, 0, 0]) == i for i, s in enumerate(got))
    assert got[3]["meta"]["target_shape"] == [4, 1, 4, 4] and got[3]["meta"]["prompt"] == "p3"
    assert next_index(tmp_path, 0) == 3 and next_index(tmp_path, 1) == 0


def test_open_shard_is_not_visible_until_closed(tmp_path):
    w = ShardWriter(tmp_path, rank=2, max_count=10)
    w.write(sample(0))
    assert list_shards(tmp_path) == []
    assert [p.name for p in tmp_path.glob("*.tmp")] == [f"pairs-r002-000000.tar.{os.getpid()}.tmp"]
    assert remove_partial(tmp_path, rank=1) == 0 and remove_partial(tmp_path, rank=2) == 1
    assert not list(tmp_path.iterdir())


def _tar_with(path, entries):
    with tarfile.open(path, "w") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_pickle_entries_are_refused(tmp_path):
    import pickle
    _tar_with(tmp_path / "evil.tar", {"x.pth": pickle.dumps({"a": 1}), "x.json": b"{}"})
    with pytest.raises(ShardError, match=r"evil.tar: sample x: expected entries"):
        list(read_shards([tmp_path / "evil.tar"]))


def test_corrupt_payload_names_the_shard_and_sample(tmp_path):
    good = sample(1)
    _tar_with(tmp_path / "bad.tar", {"k1.tensors.safetensors": good["tensors.safetensors"][:20],
                                     "k1.json": good["json"]})
    with pytest.raises(ShardError, match=r"bad.tar: sample k1: cannot decode"):
        list(read_shards([tmp_path / "bad.tar"]))


def test_missing_fields_and_schema_version():
    raw = {"__key__": "k", "__url__": "u.tar", **{k: v for k, v in sample(0).items() if k != "__key__"}}
    meta = json.loads(raw["json"])
    assert decode_sample(raw)["key"] == "k0000"
    with pytest.raises(ShardError, match="schema 99"):
        decode_sample({**raw, "json": json.dumps({**meta, "schema": 99}).encode()})
    with pytest.raises(ShardError, match="missing fields \\['source'\\]"):
        decode_sample({**raw, "json": json.dumps({k: v for k, v in meta.items() if k != "source"}).encode()})


def test_truncated_tar_is_named(tmp_path):
    with ShardWriter(tmp_path, rank=0, max_count=4) as w:
        for i in range(4):
            w.write(sample(i))
    shard = list_shards(tmp_path)[0]
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(ShardError, match=f"{shard.name}: not a readable tar shard"):
        shard_keys(shard)
    with pytest.raises(ShardError, match=f"{shard.name}: cannot read"):
        list(read_shards([shard]))


def test_cut_inside_an_entry_is_detected(tmp_path):
    with ShardWriter(tmp_path, rank=0, max_count=4) as w:
        for i in range(4):
            w.write(sample(i))
    shard = list_shards(tmp_path)[0]
    data = shard.read_bytes()
    with tarfile.open(shard) as t:
        last = t.getmembers()[-1]
    for cut in (len(data) // 2, last.offset, last.offset_data + last.size // 2):  # mid-data and a clean boundary
        shard.write_bytes(data[:cut])
        with pytest.raises(ShardError, match=f"{shard.name}: (truncated|not a readable)"):
            shard_keys(shard)


def test_writer_never_touches_another_writers_temporary_file(tmp_path):
    other = tmp_path / "pairs-r000-000000.tar.tmp"  # another process's shard in progress (old-style name)
    other.write_bytes(b"someone else's half-written shard")
    with ShardWriter(tmp_path, rank=0, max_count=1) as w:
        w.write(sample(0))
    assert other.read_bytes() == b"someone else's half-written shard"
    assert [s["key"] for s in read_shards(list_shards(tmp_path))] == ["k0000"]


def test_out_dir_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path, caplog):
    import socket
    import subprocess
    import sys
    host, lock = socket.gethostname(), lock_path(tmp_path, 0)
    with OutDirLock(tmp_path, 0):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"{lock}: rank 0 of {tmp_path} is being written by pid {os.getpid()} "
                                              rf"on {host}"):
            OutDirLock(tmp_path, 0).acquire()
        with OutDirLock(tmp_path, 1):  # another rank: its own lock
            pass
    assert not list(tmp_path.iterdir())  # released, no temporary file left
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for owner in ({"host": host, "pid": dead.pid}, {"host": host, "pid": os.getppid(), "started": "0"}):  # reused pid
        lock.write_text(json.dumps(owner))
        with caplog.at_level("WARNING", logger="surf_train.shards"), OutDirLock(tmp_path, 0):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert f"{lock}: taking over the stale lock of pid {owner['pid']} on {host} (no longer running)" in caplog.text
    lock.write_text(json.dumps({"host": "another-node", "pid": dead.pid}))  # cannot be checked from here
    with pytest.raises(ConfigError, match="being written by pid .* on another-node; wait for it"):
        OutDirLock(tmp_path, 0).acquire()
    lock.write_text("garbage")
    with pytest.raises(ConfigError, match="unreadable lock file"):
        OutDirLock(tmp_path, 0).acquire()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"out_dir={tmp_path / 'file'} is an existing file, not a directory"):
        OutDirLock(tmp_path / "file", 0).acquire()
