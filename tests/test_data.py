import io
import json
import logging
import os
import pickle
import socket
import tarfile

import pytest
import torch
from safetensors.torch import load, save

from surf_train.common.errors import ConfigError
from surf_train.data.datamodule import DataConfig, PairDataModule, resolve_shards
from surf_train.data.shards import ShardError, ShardWriter, encode_sample, list_shards, read_shards

C, TEXT = 2, (3, 8)


def make_sample(i, frames=5, size=4, text=True):
    """Sample i: every element of frame f is 1000 * i + f, in preview (C, F, size/2, size/2) and target."""
    t = (torch.arange(frames, dtype=torch.float32) + 1000 * i).view(1, frames, 1, 1).expand(C, frames, size, size)
    tensors = {"preview": t[:, :, : size // 2, : size // 2].clone(), "target": t.clone()}
    if text:
        tensors["text"] = torch.full(TEXT, float(i))
    return encode_sample(f"k{i:04d}", tensors, {"source": "generated"})


def write(directory, counts, start=0, prefix="pairs", **kw):
    """Shards with counts[j] samples each (keys continue from `start`); returns the next free index."""
    i = start
    for j, n in enumerate(counts):
        with ShardWriter(directory, rank=0, max_count=n, prefix=prefix, start_index=j) as w:
            for _ in range(n):
                w.write(make_sample(i, **kw))
                i += 1
    return i


def epoch_keys(dm):
    return [b["keys"] for b in dm.train_dataloader()]


def cfg(d, **kw):
    return DataConfig(**{"shards": str(d), "batch_size": 2, "shuffle_buffer": 4, **kw})


def test_batch_shapes_and_dtypes(tmp_path):
    write(tmp_path, [3, 3, 2])
    dm = PairDataModule(cfg(tmp_path, batch_size=3, val_samples=2))
    (b, *_) = dm.train_dataloader()
    assert b["preview"].shape == (3, C, 5, 2, 2) and b["target"].shape == (3, C, 5, 4, 4)
    assert b["text"].shape == (3, *TEXT)
    assert all(b[k].dtype == torch.float32 for k in ("preview", "target", "text"))
    assert len(b["keys"]) == len(b["meta"]) == 3 and b["meta"][0]["key"] == b["keys"][0]
    (v,) = dm.val_dataloader()
    assert v["target"].shape == (2, C, 5, 4, 4) and v["keys"] == ["k0006", "k0007"]
    (b, *_) = PairDataModule(cfg(tmp_path, text=False)).train_dataloader()
    assert "text" not in b and b["preview"].shape[0] == 2


def test_batches_never_mix_shapes(tmp_path):
    with ShardWriter(tmp_path, rank=0, max_count=5) as w:
        for i in range(20):
            w.write(make_sample(i, size=4 if i % 3 else 8))
    dm = PairDataModule(cfg(tmp_path, batch_size=3, shuffle_buffer=8, samples_per_epoch=60, val_samples=0))
    sizes = set()
    for b in dm.train_dataloader():
        want = [4 if int(k[1:]) % 3 else 8 for k in b["keys"]]
        assert len(set(want)) == 1 and b["target"].shape[-1] == want[0], b["keys"]
        sizes.add(want[0])
    assert sizes == {4, 8}
    # validation groups equal shapes too: sorted keys k0015..k0019 -> sizes 8, 4, 4, 8, 4
    dm = PairDataModule(cfg(tmp_path, batch_size=2, val_samples=5))
    assert [b["keys"] for b in dm.val_dataloader()] == [["k0015", "k0018"], ["k0016", "k0017"], ["k0019"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_same_steps_on_every_rank_with_uneven_shards(tmp_path, workers):
    write(tmp_path, [5, 2, 1, 1])  # 3 training shards of 5, 2 and 1 samples
    for spe, steps in ((7, 3), (None, 2)):  # None: 8 training samples // 2 ranks // batch 2
        for rank in (0, 1):
            dm = PairDataModule(cfg(tmp_path, num_workers=workers, samples_per_epoch=spe), rank=rank, world_size=2)
            loader = dm.train_dataloader()
            assert len(loader) == steps and [len(epoch_keys(dm)) for _ in range(2)] == [steps, steps]


def test_ranks_and_epochs_draw_different_reproducible_streams(tmp_path):
    write(tmp_path, [4, 4, 4, 1])

    def keys(rank, epochs=1):
        dm = PairDataModule(cfg(tmp_path, samples_per_epoch=12), rank=rank, world_size=2)
        loader = dm.train_dataloader()
        return [sum((b["keys"] for b in loader), []) for _ in range(epochs)]

    (r0e0, r0e1), (r1e0,) = keys(0, 2), keys(1)
    assert r0e0 != r1e0 and r0e0 != r0e1
    assert keys(0) == [r0e0]  # same seed, rank and epoch: same stream


def test_temporal_crop_is_one_window_for_preview_and_target(tmp_path):
    write(tmp_path, [4, 4, 1], frames=9)
    dm = PairDataModule(cfg(tmp_path, crop_frames=4, samples_per_epoch=40))
    starts = set()
    for b in dm.train_dataloader():
        assert b["preview"].shape[2] == b["target"].shape[2] == 4
        for j, m in enumerate(b["meta"]):
            frames = b["target"][j, 0, :, 0, 0] % 1000  # frame index encoded in the values
            start = int(frames[0])
            assert frames.tolist() == list(range(start, start + 4)) and m["crop"] == [start, start + 4]
            assert torch.equal(b["preview"][j, :, :, 0, 0], b["target"][j, :, :, 0, 0])
            starts.add(start)
    assert len(starts) > 1 and starts <= set(range(6))
    (v,) = dm.val_dataloader()  # validation: the first window, deterministic
    assert v["target"][0, 0, :, 0, 0].tolist() == [8000, 8001, 8002, 8003]


def test_validation_set_is_fixed_and_held_out(tmp_path):
    write(tmp_path, [3, 3, 3, 3])
    c = cfg(tmp_path, val_holdout=2, val_samples=5)
    dm = PairDataModule(c)
    assert len(dm.val_set()) == 5
    assert [p.name for p in dm.val_shards] == ["pairs-r000-000002.tar", "pairs-r000-000003.tar"]
    keys = [k for b in dm.val_dataloader() for k in b["keys"]]
    assert keys == [f"k{i:04d}" for i in range(6, 11)] == [k for b in dm.val_dataloader() for k in b["keys"]]
    assert [k for b in PairDataModule(c).val_dataloader() for k in b["keys"]] == keys
    train = {k for ks in epoch_keys(dm) for k in ks}
    assert train and train <= {f"k{i:04d}" for i in range(6)}
    # explicit val_shards; under DDP Lightning wraps the loader with a DistributedSampler: equal batch counts
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    dm = PairDataModule(
        cfg(tmp_path, val_shards=str(tmp_path / "pairs-r000-00000{0,1}.tar"), val_samples=6, batch_size=4)
    )
    loader = dm.val_dataloader()
    per_rank = [
        [b["keys"] for b in _update_dataloader(loader, DistributedSampler(loader.dataset, 2, r, shuffle=False))]
        for r in (0, 1)
    ]
    assert per_rank == [[[f"k{i:04d}" for i in range(4)]], [["k0004", "k0005"]]]
    assert [p.name for p in dm.train_shards] == ["pairs-r000-000002.tar", "pairs-r000-000003.tar"]


def _truncate(shard):
    """Cut the shard inside its last sample: the tar index still lists it, reading finds the loss."""
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.6)])


def test_corrupt_shard_is_named(tmp_path):
    write(tmp_path, [3, 3, 1])
    cut, junk = list_shards(tmp_path)[1], tmp_path / "pairs-r000-000001z.tar"
    _truncate(cut)
    with pytest.raises(ShardError, match=cut.name):  # found while streaming
        for _ in range(3):
            epoch_keys(PairDataModule(cfg(tmp_path, samples_per_epoch=20)))
    with pytest.raises(ShardError, match=f"{cut.name}: truncated"):  # found in the tar index at setup
        PairDataModule(cfg(tmp_path)).setup("fit")
    junk.write_bytes(b"not a tar " * 100)
    cut.unlink()
    with pytest.raises(ShardError, match=junk.name):  # found in the tar index at setup
        PairDataModule(cfg(tmp_path)).setup("fit")
    with pytest.raises(ShardError, match=junk.name):  # found while streaming (no index scan)
        for _ in range(3):
            epoch_keys(PairDataModule(cfg(tmp_path, samples_per_epoch=20)))


def _bad_payload_shard(path, evil=None):
    """One good sample k0100 and one sample whose safetensors bytes are cut (or a pickle `.pth` entry)."""
    good, bad = make_sample(100), make_sample(101)
    entries = {f"k0100.{k}": v for k, v in good.items() if k != "__key__"}
    if evil is None:
        entries.update({"k0101.tensors.safetensors": bad["tensors.safetensors"][:30], "k0101.json": bad["json"]})
    else:
        entries.update({"k0101.pth": evil, "k0101.json": bad["json"]})
    with tarfile.open(path, "w") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_corrupt_counts_and_keeps_the_rest(tmp_path, caplog, workers):
    write(tmp_path, [3, 3, 1])
    cut, junk = list_shards(tmp_path)[1], tmp_path / "pairs-r000-000001z.tar"
    _truncate(cut)  # k0003 survives, k0005 is cut
    junk.write_bytes(b"not a tar " * 100)
    _bad_payload_shard(tmp_path / "pairs-r000-000000x.tar")
    dm = PairDataModule(cfg(tmp_path, skip_corrupt=True, num_workers=workers, samples_per_epoch=40, val_samples=0))
    with caplog.at_level(logging.WARNING, logger="surf_train.data.datamodule"):
        seen = {k for ks in epoch_keys(dm) for k in ks}
    assert {"k0000", "k0001", "k0002", "k0003", "k0100", "k0006"} <= seen and not seen & {"k0005", "k0101"}
    assert dm.skipped >= 3  # the junk shard and two samples, once per worker
    if workers == 0:  # worker processes log to their own stderr
        text = caplog.text
        for name in (junk.name, f"{cut.name}: sample k0005", "x.tar: sample k0101", "(3 skipped so far)"):
            assert name in text
    # the index scan at setup skips the unreadable and the truncated shard before streaming
    dm = PairDataModule(cfg(tmp_path, skip_corrupt=True, val_samples=0))
    dm.setup()
    assert junk not in dm.train_shards and cut not in dm.train_shards
    assert dm.skipped == 2 and dm.train_samples == 3 + 2 + 1


class _Evil:
    def __reduce__(self):
        return (open, (os.environ["SURF_EVIL"], "w"))


def test_pickle_entry_is_refused_not_unpickled(tmp_path, monkeypatch):
    flag = tmp_path / "unpickled"
    monkeypatch.setenv("SURF_EVIL", str(flag))
    (tmp_path / "s").mkdir()
    _bad_payload_shard(tmp_path / "s" / "evil.tar", evil=pickle.dumps(_Evil()))
    c = cfg(tmp_path / "s", val_samples=0, samples_per_epoch=4)
    with pytest.raises(ShardError, match=r"evil.tar: sample k0101: expected entries"):
        epoch_keys(PairDataModule(c))
    dm = PairDataModule(DataConfig(**{**c.__dict__, "skip_corrupt": True}))
    assert {k for ks in epoch_keys(dm) for k in ks} == {"k0100"} and dm.skipped == 1
    assert not flag.exists()


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no shards"):
        PairDataModule(cfg(tmp_path)).setup()
    write(tmp_path, [2])
    with pytest.raises(ConfigError, match="leaves no training shards"):
        PairDataModule(cfg(tmp_path)).setup()
    with pytest.raises(ConfigError, match="do not exist"):
        resolve_shards(str(tmp_path / "pairs-r000-00000{0..1}.tar"))
    assert resolve_shards(str(tmp_path / "*.tar")) == resolve_shards(str(tmp_path / "pairs-r000-00000{0..0}.tar"))
    with pytest.raises(ConfigError, match="batch_size"):
        DataConfig(batch_size=0)


def test_lightning_fit_runs_the_fixed_number_of_steps(tmp_path):
    import lightning.pytorch as pl

    write(tmp_path, [3, 3, 2])

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w, self.steps, self.val = torch.nn.Parameter(torch.zeros(())), [], []

        def training_step(self, b, i):
            self.steps.append(self.current_epoch)
            return (b["target"].mean() - self.w) ** 2

        def validation_step(self, b, i):
            self.val += b["keys"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    m, dm = M(), PairDataModule(cfg(tmp_path, samples_per_epoch=6, val_samples=2))
    pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    ).fit(m, datamodule=dm)
    assert m.steps == [0, 0, 0, 1, 1, 1] and m.val == ["k0006", "k0007"] * 2


def _ddp_rank(rank, port, shards, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dm = PairDataModule(DataConfig(shards=shards, batch_size=2, shuffle_buffer=4, num_workers=1))
        keys = [b["keys"] for b in dm.train_dataloader()]
        n = torch.tensor([len(keys)])
        lo, hi = n.clone(), n.clone()
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        seqs = [None, None]
        dist.all_gather_object(seqs, keys)
        out.put((rank, int(lo), int(hi), dm.steps_per_epoch, seqs[0] != seqs[1]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_run_equal_steps(tmp_path):
    import multiprocessing as mp

    write(tmp_path, [5, 2, 3, 1])  # training: 10 samples in uneven shards -> 5 per rank -> 2 steps
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # forked from this process: no second import of torch and lightning
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, str(tmp_path), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == [(0, 2, 2, 2, True), (1, 2, 2, 2, True)]


def _flip_tensor_byte(shard, key):
    """Flip one bit inside the tensor values of sample `key` (the tar structure stays intact)."""
    with tarfile.open(shard) as t:
        m = t.getmember(f"{key}.tensors.safetensors")
    data = bytearray(shard.read_bytes())
    data[m.offset_data + m.size - 2] ^= 0x10
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_corrupt_validation_shard_is_skipped_and_counted_or_named(tmp_path, damage):
    write(tmp_path, [3, 3, 3])
    val = list_shards(tmp_path)[-1]  # the held-out shard: k0006, k0007, k0008
    _truncate(val) if damage == "truncated" else _flip_tensor_byte(val, "k0007")
    named = f"{val.name}: truncated" if damage == "truncated" else f"{val.name}: sample k0007: checksum mismatch"
    with pytest.raises(ShardError, match=named):
        PairDataModule(cfg(tmp_path, val_samples=3)).val_dataloader()
    dm = PairDataModule(cfg(tmp_path, val_samples=3, skip_corrupt=True))
    keys = [k for b in dm.val_dataloader() for k in b["keys"]]
    assert keys == ([] if damage == "truncated" else ["k0006", "k0008"]) and dm.skipped == 1
    assert {k for ks in epoch_keys(dm) for k in ks} <= {f"k{i:04d}" for i in range(6)}  # training goes on


def test_flipped_tensor_byte_in_training_is_skipped_and_counted(tmp_path):
    write(tmp_path, [3, 3, 1])
    _flip_tensor_byte(list_shards(tmp_path)[0], "k0001")
    with pytest.raises(ShardError, match="pairs-r000-000000.tar: sample k0001: checksum mismatch"):
        for _ in range(3):
            epoch_keys(PairDataModule(cfg(tmp_path, samples_per_epoch=20, val_samples=0)))
    dm = PairDataModule(cfg(tmp_path, samples_per_epoch=20, val_samples=0, skip_corrupt=True))
    seen = {k for ks in epoch_keys(dm) for k in ks}
    assert "k0001" not in seen and {"k0000", "k0002"} <= seen and dm.skipped == 1


def _text_sample(i, rows, padded_to=6, old=False):
    """Sample i whose text has `rows` real rows (value i + 1) zero-padded to `padded_to`, as encoders give it;
    old=True writes it the way shards were written before: padded text, no sha256 / text_length."""
    text = torch.zeros(padded_to, TEXT[1])
    text[:rows] = i + 1.0
    raw = make_sample(i, text=False)
    if not old:
        return encode_sample(raw["__key__"], {**_tensors(raw), "text": text}, {"source": "generated"})
    meta = {k: v for k, v in json.loads(raw["json"]).items() if k != "sha256"}
    return {**raw, "tensors.safetensors": save({**_tensors(raw), "text": text}), "json": json.dumps(meta).encode()}


def _tensors(raw):
    return load(raw["tensors.safetensors"])


def test_text_is_padded_per_batch_and_old_padded_shards_still_read(tmp_path):
    rows = {i: 1 + i % 3 for i in range(9)}  # real text lengths 1, 2, 3, ...
    for j in range(3):
        with ShardWriter(tmp_path, rank=0, max_count=3, start_index=j) as w:
            for i in range(3 * j, 3 * j + 3):
                w.write(_text_sample(i, rows[i], old=(j == 1)))  # shard 1 is written the old way
    stored = {s["key"]: s["text"].shape[0] for s in read_shards(list_shards(tmp_path))}
    assert stored == {f"k{i:04d}": (6 if 3 <= i < 6 else rows[i]) for i in range(9)}
    dm = PairDataModule(cfg(tmp_path, batch_size=2, samples_per_epoch=30, val_samples=3))
    batches = [b for b in dm.train_dataloader()] + [b for b in dm.val_dataloader()]
    old_seen = False
    for b in batches:
        ids = [int(k[1:]) for k in b["keys"]]
        lengths = [6 if 3 <= i < 6 else rows[i] for i in ids]
        assert b["text"].shape == (len(ids), max(lengths), TEXT[1])  # padded to the batch's longest
        for j, i in enumerate(ids):  # the real rows, then zeros: what the zero-padded text was
            assert (b["text"][j, : rows[i]] == i + 1).all() and not b["text"][j, rows[i] :].any()
        old_seen |= any(3 <= i < 6 for i in ids)
    assert old_seen and len({b["text"].shape[1] for b in batches}) > 1


def test_refiner_output_does_not_depend_on_text_padding():
    """Stored at its real length and padded per batch, text gives the Refiner the output the zero-padded
    text gave: all-zero rows are padding, masked by the Refiner itself (refiner.text_padding_mask), so the
    generation paths, which pass no mask, see the tokens training saw."""
    from surf_train.training.module import RefinerModule

    torch.manual_seed(0)
    m = RefinerModule(model={"preset": "tiny"})
    with torch.no_grad():
        for p in m.net.parameters():  # the output layer starts at zero: give every weight a value
            p.normal_(0, 0.2)
    x, cond, t = torch.randn(2, 16, 3, 8, 8), torch.randn(2, 16, 3, 8, 8), torch.tensor([0.3, 0.8])
    padded = torch.zeros(2, 16, 32)  # max_sequence_length 16, real lengths 5 and 9
    padded[0, :5], padded[1, :9] = torch.randn(5, 32), torch.randn(9, 32)
    trimmed = padded[:, :9]  # what collate gives for this batch
    with torch.no_grad():
        a = m.net(x, t, cond, padded).sample
        b = m.net(x, t, cond, trimmed).sample
        unmasked = m.net(x, t, cond, padded, torch.ones(2, 16, dtype=torch.bool)).sample  # the padding attended to
        other = m.net(x, t, cond, torch.randn(2, 9, 32), None).sample
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, other, atol=1e-2)
    assert not torch.allclose(a, unmasked, atol=1e-3)
