import pytest
import torch

from surf_train.common.errors import ConfigError
from surf_train.data.datamodule import DataConfig, PairDataModule
from surf_train.data.shards import ShardWriter, encode_sample


def write(directory, shards, per_shard, tag):
    """`shards` shards of `per_shard` samples; keys <tag>NNNN, preview (2, 3, 2, 2), target (2, 3, 4, 4)."""
    i = 0
    for j in range(shards):
        with ShardWriter(directory, rank=0, max_count=per_shard, start_index=j) as w:
            for _ in range(per_shard):
                t = torch.full((2, 3, 4, 4), float(i))
                w.write(
                    encode_sample(f"{tag}{i:04d}", {"preview": t[..., :2, :2].clone(), "target": t}, {"source": tag})
                )
                i += 1
    return directory


def mixed(a, b, wa, wb, **kw):
    return DataConfig(
        shards=None,
        sources={"gen": {"shards": str(a), "weight": wa}, "real": {"shards": str(b), "weight": wb}},
        **{"batch_size": 4, "shuffle_buffer": 16, "val_samples": 0, **kw},
    )


def source_share(dm, epochs):
    n = {"gen": 0, "real": 0}
    for _ in range(epochs):
        for b in dm.train_dataloader():
            for m in b["meta"]:
                assert m["data_source"] in n and m["source"] == {"gen": "g", "real": "r"}[m["data_source"]]
                n[m["data_source"]] += 1
    return n["gen"] / (n["gen"] + n["real"]), n["gen"] + n["real"]


@pytest.mark.parametrize("wa,wb", [(3, 1), (1, 1), (1, 4)])
def test_sources_are_drawn_in_proportion_to_their_weights(tmp_path, wa, wb):
    """Sizes differ on purpose: 8 shards of 6 samples vs 2 shards of 2. Uniform shard draws would give the
    first source 92% of the samples; the weights must win instead."""
    a = write(tmp_path / "a", 8, 6, "g")
    b = write(tmp_path / "b", 2, 2, "r")
    dm = PairDataModule(mixed(a, b, wa, wb, samples_per_epoch=800))
    dm.setup()
    assert dm.source_samples == {"gen": 48, "real": 4} and dm.train_samples == 52
    share, n = source_share(dm, 3)
    want = wa / (wa + wb)
    # shards are drawn whole (6 or 2 samples): the share's standard error is that of the number of draws of
    # the first source's shards, m * sqrt(D p (1 - p)) / n with D draws in all
    p = (wa / 48 * 8) / (wa / 48 * 8 + wb / 4 * 2)
    draws = n / (p * 6 + (1 - p) * 2)
    se = 6 * (draws * p * (1 - p)) ** 0.5 / n
    assert n == 2400 and abs(share - want) < 4 * se, (share, want, se)


def test_single_source_is_unchanged_and_mixed_validation_holds_out_each_source(tmp_path):
    a = write(tmp_path / "a", 3, 2, "g")
    b = write(tmp_path / "b", 2, 2, "r")
    one = PairDataModule(DataConfig(shards=str(a), batch_size=2, val_samples=2))
    assert one.shard_weights is None and all(
        "data_source" not in m for bt in one.train_dataloader() for m in bt["meta"]
    )
    dm = PairDataModule(mixed(a, b, 1, 1, val_samples=4, batch_size=2))
    dm.setup()
    # the last shard of each source is held out; training never sees those keys
    assert [p.parent.name + "/" + p.name for p in dm.val_shards] == [
        "a/pairs-r000-000002.tar",
        "b/pairs-r000-000001.tar",
    ]
    val = dm.val_set()
    assert sorted(s["key"] for s in val) == ["g0004", "g0005", "r0002", "r0003"]
    assert {s["meta"]["data_source"] for s in val} == {"gen", "real"}
    train = {k for bt in dm.train_dataloader() for k in bt["keys"]}
    assert train and not train & {"g0004", "g0005", "r0002", "r0003"}


def test_source_errors_name_the_source(tmp_path):
    a = write(tmp_path / "a", 2, 2, "g")
    with pytest.raises(ConfigError, match=r"data.sources.real.weight must be a number > 0"):
        mixed(a, a, 1, 0)
    with pytest.raises(ConfigError, match=r"data.sources.real: expected \{shards: ..., weight: ...\}"):
        DataConfig(sources={"real": {"shard": str(a)}})
    with pytest.raises(ConfigError, match="give data.shards .* or data.sources"):
        DataConfig(shards=None)
    with pytest.raises(ConfigError, match=r"no shards \(\*.tar\) match data.sources.real.shards="):
        PairDataModule(mixed(a, tmp_path / "nothing", 1, 1)).setup()
    one = write(tmp_path / "one", 1, 2, "r")
    with pytest.raises(ConfigError, match=r"leaves no training shards among the 1 matching data.sources.real"):
        PairDataModule(mixed(a, one, 1, 1, val_samples=2)).setup()


def test_generated_and_video_pairs_mix_in_batches(pairs, video_pairs):
    """The two real producers write one schema: same-shaped samples (64x64 bucket, 9 frames) share batches."""
    out, _ = video_pairs
    dm = PairDataModule(
        DataConfig(
            shards=None,
            sources={"gen": {"shards": str(pairs), "weight": 1}, "real": {"shards": str(out), "weight": 1}},
            batch_size=2,
            samples_per_epoch=64,
            val_samples=0,
            shuffle_buffer=16,
        )
    )
    seen, mixed_batches = set(), 0
    for b in dm.train_dataloader():
        srcs = {m["data_source"] for m in b["meta"]}
        seen |= srcs
        mixed_batches += len(srcs) == 2
        assert b["text"].shape[1] <= 16 and b["text"].shape[2] == 32  # padded to the batch's longest text
        assert b["preview"].shape[2] == b["target"].shape[2] == 3
        assert {m["source"] for m in b["meta"]} == {{"gen": "generated", "real": "video"}[s] for s in srcs}
    assert seen == {"gen", "real"} and mixed_batches > 0


def shards_of(directory, base: str, channels: int, text_dim: int | None):
    """One shard of 2 samples as make_pairs writes them for base model `base`."""
    meta = {"source": "generated", "base": {"name": base, "id": f"tiny:{base}", "revision": None, "family": "wan"}}
    with ShardWriter(directory, rank=0, max_count=2) as w:
        for i in range(2):
            t = {"preview": torch.zeros(channels, 3, 4, 4), "target": torch.zeros(channels, 3, 8, 8)}
            t |= {"text": torch.ones(5, text_dim)} if text_dim else {}
            w.write(encode_sample(f"{base}{i:04d}", t, meta))
    return directory


@pytest.mark.parametrize(
    "other,why",
    [
        (("toy", 12, 32), "latent channels 16 vs 12"),
        (("tiny", 16, 48), "text width 32 vs 48"),
        (("tiny2", 16, 32), "base model"),
    ],
)
def test_incompatible_sources_are_refused_before_step_1(tmp_path, other, why):
    """Two sources whose base model, latent channels or text width differ: one error naming both sources and
    their shards, before any training step (no checkpoint written)."""
    from test_train import FAST, compose_cfg

    from surf_train.training.train import train

    a = shards_of(tmp_path / "a", "tiny", 16, 32)
    b = shards_of(tmp_path / "b", *other)
    data = ["data=mixed", f"data.sources.generated.shards={a}", f"data.sources.real.shards={b}", "data.val_samples=0"]
    cfg = compose_cfg([*data, f"run_dir={tmp_path}/run", "trainer.max_steps=2", *FAST])
    with pytest.raises(ConfigError, match=f"data.sources.generated .*data.sources.real .*{why}"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
