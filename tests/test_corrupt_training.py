"""Training with corrupt shards: skipped and counted in the summary with data.skip_corrupt, named without."""

import json
import shutil

import pytest
from test_data import _flip_tensor_byte, _truncate
from test_train import FAST, SHRINK, compose_cfg

from surf_train.data.shards import ShardError, list_shards, shard_keys
from surf_train.training.train import train


def _run(pairs, tmp_path, *extra):
    return compose_cfg(
        [
            f"data.shards={pairs}",
            f"run_dir={tmp_path / 'run'}",
            "trainer.max_steps=2",
            "ckpt_every=2",
            "data.val_samples=4",
            *FAST,
            *SHRINK,
            *extra,
        ]
    )


def test_corrupt_validation_shard_is_skipped_and_counted(pairs, tmp_path, capsys):
    data = tmp_path / "pairs"
    shutil.copytree(pairs, data)
    val = list_shards(data)[-1]  # the held-out validation shard
    _truncate(val)
    with pytest.raises(ShardError, match=f"{val.name}: truncated"):
        train(_run(data, tmp_path))
    s = train(_run(data, tmp_path / "skip", "data.skip_corrupt=true"))  # used to raise IndexError
    assert s["steps"] == 2 and s["data_skipped"] == 1 and s["val_mse_refiner"] is None
    assert json.loads((tmp_path / "skip" / "run" / "summary.json").read_text())["data_skipped"] == 1
    assert "no validation, 1 skip(s) of corrupt shards/samples; summary:" in capsys.readouterr().out


def test_flipped_byte_in_a_validation_sample_is_skipped_and_counted(pairs, tmp_path):
    data = tmp_path / "pairs"
    shutil.copytree(pairs, data)
    val = list_shards(data)[-1]
    _flip_tensor_byte(val, shard_keys(val)[0])
    s = train(_run(data, tmp_path, "data.skip_corrupt=true"))
    assert s["data_skipped"] == 1 and s["val_mse_refiner"] > 0  # validated on the other 3 samples
