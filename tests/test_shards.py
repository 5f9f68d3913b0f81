import io
import json
import os
import tarfile

import pytest
import torch

from surf_train.common.errors import ConfigError
from surf_train.data.shards import (
    OutDirLock,
    ShardError,
    ShardWriter,
    decode_sample,
    encode_sample,
    list_shards,
    lock_path,
    next_index,
    read_shards,
    remove_partial,
    sample_bytes,
    shard_keys,
)


def sample(i, dtype=torch.float16):
    return encode_sample(
        f"k{i:04d}",
        {
            "preview": torch.full((4, 1, 2, 2), float(i), dtype=dtype),
            "target": torch.full((4, 1, 4, 4), float(i), dtype=dtype),
        },
        {"source": "generated", "prompt": f"p{i}"},
    )


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
    _tar_with(
        tmp_path / "bad.tar", {"k1.tensors.safetensors": good["tensors.safetensors"][:20], "k1.json": good["json"]}
    )
    with pytest.raises(ShardError, match=r"bad.tar: sample k1: checksum mismatch"):
        list(read_shards([tmp_path / "bad.tar"]))
    old = {k: v for k, v in json.loads(good["json"]).items() if k != "sha256"}  # written before checksums
    _tar_with(
        tmp_path / "old.tar",
        {"k1.tensors.safetensors": good["tensors.safetensors"][:20], "k1.json": json.dumps(old).encode()},
    )
    with pytest.raises(ShardError, match=r"old.tar: sample k1: cannot decode"):
        list(read_shards([tmp_path / "old.tar"]))


def _entry(shard, name):
    with tarfile.open(shard) as t:
        return next(m for m in t.getmembers() if m.name == name)


def test_flipped_tensor_byte_is_caught(tmp_path):
    """One flipped bit in the tensor data decodes to a wrong value unless the checksum catches it."""
    with ShardWriter(tmp_path, rank=0, max_count=4) as w:
        for i in range(3):
            w.write(sample(i))
    shard = list_shards(tmp_path)[0]
    m = _entry(shard, "k0001.tensors.safetensors")
    data = bytearray(shard.read_bytes())
    data[m.offset_data + m.size - 3] ^= 0x04  # inside the last tensor's values, not the safetensors header
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{shard.name}: sample k0001: checksum mismatch in tensors.safetensors"):
        list(read_shards([shard]))
    assert len(shard_keys(shard)) == 3  # the tar structure is intact: only the checksum can tell


def test_old_shards_without_checksum_or_text_length_still_read(tmp_path):
    from safetensors.torch import save

    text = torch.zeros(16, 8)
    text[:3] = 1.0
    tensors = {"preview": torch.ones(4, 1, 2, 2), "target": torch.ones(4, 1, 4, 4), "text": text}
    meta = {
        "key": "k0",
        "schema": 1,
        "source": "generated",
        "preview_shape": [4, 1, 2, 2],
        "target_shape": [4, 1, 4, 4],
    }  # what encode_sample wrote before: text padded, no sha256 / text_length
    _tar_with(tmp_path / "old.tar", {"k0.tensors.safetensors": save(tensors), "k0.json": json.dumps(meta).encode()})
    (s,) = read_shards([tmp_path / "old.tar"])
    assert torch.equal(s["text"], text) and "sha256" not in s["meta"]


def test_text_is_stored_at_its_real_length():
    text = torch.zeros(16, 8)
    text[:5] = 1.0
    text[2] = 0.0  # a zero row inside the text stays: only the trailing padding goes
    raw = encode_sample(
        "k",
        {"preview": torch.ones(4, 1, 2, 2), "target": torch.ones(4, 1, 4, 4), "text": text},
        {"source": "generated"},
    )
    s = decode_sample(raw)
    assert torch.equal(s["text"], text[:5]) and s["meta"]["text_length"] == 5
    empty = decode_sample(
        encode_sample(
            "k",
            {"preview": torch.ones(4, 1, 2, 2), "target": torch.ones(4, 1, 4, 4), "text": torch.zeros(16, 8)},
            {"source": "generated"},
        )
    )
    assert empty["text"].shape == (1, 8) and empty["meta"]["text_length"] == 1  # never an empty tensor
    bad = json.loads(raw["json"])
    with pytest.raises(ShardError, match="text has 5 rows but text_length=7"):
        decode_sample({**raw, "json": json.dumps({**bad, "text_length": 7}).encode()})


def test_sample_bytes_is_what_the_writer_writes(tmp_path):
    text = torch.zeros(16, 64, dtype=torch.bfloat16)
    text[:6] = 2.0
    raw = encode_sample(
        "k0000",
        {
            "preview": torch.ones(4, 3, 2, 2, dtype=torch.bfloat16),
            "target": torch.ones(4, 3, 4, 4, dtype=torch.bfloat16),
            "text": text,
        },
        {"source": "generated", "prompt": "a cat"},
    )
    with ShardWriter(tmp_path, rank=0, max_count=3) as w:
        for _ in range(3):
            w.write(raw)
    want = sample_bytes((4, 3, 2, 2), (4, 3, 4, 4), (6, 64), torch.bfloat16, {"prompt": "a cat"})
    shard = list_shards(tmp_path)[0]
    assert _entry(shard, "k0000.json").offset == 0 and -(-(3 * want + 1024) // 10240) * 10240 == shard.stat().st_size
    assert sample_bytes((4, 3, 2, 2), (4, 3, 4, 4), (16, 64), torch.bfloat16) > want  # padded text: more


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
    with pytest.raises(ShardError, match=f"{shard.name}: truncated \\(700 bytes"):
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


def test_flipped_tar_header_byte_is_named_not_truncated(tmp_path):
    with ShardWriter(tmp_path, rank=0, max_count=4) as w:
        for i in range(4):
            w.write(sample(i))
    shard = list_shards(tmp_path)[0]
    data = shard.read_bytes()
    second = _entry(shard, "k0001.json")
    later = f"invalid tar header at byte {second.offset} \\(bad checksum\\) after 2 entries"
    # entries have an extended (pax) header before the plain one: a flipped byte in either is named
    for at, msg in (
        (1, "not a readable tar shard \\(first tar header: bad checksum\\)"),
        (second.offset + 1, later),
        (second.offset_data - 512 + 1, later),
    ):
        bad = bytearray(data)
        bad[at] ^= 0x10  # a byte of an entry's name
        shard.write_bytes(bytes(bad))
        with pytest.raises(ShardError, match=f"{shard.name}: {msg}"):
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
        with pytest.raises(
            ConfigError,
            match=rf"{lock}: rank 0 of {tmp_path} is being written by pid {os.getpid()} "
            rf"on {host}",
        ):
            OutDirLock(tmp_path, 0).acquire()
        with OutDirLock(tmp_path, 1):  # another rank: its own lock
            pass
    assert not list(tmp_path.iterdir())  # released, no temporary file left
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for owner in ({"host": host, "pid": dead.pid}, {"host": host, "pid": os.getppid(), "started": "0"}):  # reused pid
        lock.write_text(json.dumps(owner))
        with caplog.at_level("WARNING", logger="surf_train.data.shards"), OutDirLock(tmp_path, 0):
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


def test_masked_text_padding_is_zeroed_and_not_stored():
    """HunyuanVideo's encoder returns non-zero embeddings at padding positions with a mask: stored zeroed
    and dropped, at the prompt's real length (else every pad token is stored and attended to)."""
    from surf_train.base.adapter import Cond

    embeds = torch.randn(2, 8, 4) + 3  # (B, L, D), no zero anywhere
    cond = Cond(embeds=embeds, extra={"mask": torch.tensor([[1] * 3 + [0] * 5, [1] * 8])})
    latents = {"preview": torch.ones(4, 1, 2, 2), "target": torch.ones(4, 1, 4, 4)}
    stored = [
        decode_sample(encode_sample("k", {**latents, "text": cond.text(i)}, {"source": "generated"})) for i in range(2)
    ]
    assert [s["meta"]["text_length"] for s in stored] == [3, 8]
    assert torch.equal(stored[0]["text"], embeds[0, :3]) and torch.equal(stored[1]["text"], embeds[1])
    assert torch.equal(Cond(embeds=embeds).text(0), embeds[0])  # no mask (Wan): zero-padded already
