import io
import json
import tarfile

import pytest
import torch

from surf_train.shards import (ShardError, ShardWriter, decode_sample, encode_sample, list_shards, next_index,
                               read_shards, remove_partial, shard_keys)


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
    assert list_shards(tmp_path) == [] and len(list(tmp_path.glob("*.tar.tmp"))) == 1
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
