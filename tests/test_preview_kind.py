"""The preview-kind condition: what a preview is (exact, degraded, generated) is recorded by the pair writers,
read back (or inferred for older shards) into every batch, told to a Refiner with kind_condition in training,
and chosen by the caller at inference (docs/method.md#preview-kinds)."""

import pytest
import torch
from test_train import FAST, SHRINK, compose_cfg

from surf_train.data.meta import preview_kind
from surf_train.data.pairs import PairsConfig, make_pairs
from surf_train.data.shards import ShardError, read_shards
from surf_train.data.stream import collate
from surf_train.models.loading import load_refiner
from surf_train.models.refiner import PREVIEW_KINDS, Refiner, RefinerConfig
from surf_train.models.sampler import RefinerSampler, upsample
from surf_train.training.export import export
from surf_train.training.train import train


def kind_refiner(**kw) -> Refiner:
    torch.manual_seed(0)
    net = Refiner.from_cfg(RefinerConfig(dim=32, depth=2, heads=2, kind_condition=True, **kw))
    with torch.no_grad():  # trained-looking weights: the zero-initialised output would hide every difference
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(b=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 16, 2, 8, 8, generator=g)
    return x, torch.rand(b, generator=g), torch.randn(b, 16, 2, 8, 8, generator=g), torch.randn(b, 5, 32, generator=g)


def test_the_kind_changes_the_output_and_names_equal_indices():
    net = kind_refiner()
    x, t, cond, text = inputs()
    out = {k: net(x, t, cond, text, preview_kind=k).sample for k in PREVIEW_KINDS}
    for a in PREVIEW_KINDS:
        for b in PREVIEW_KINDS:
            assert (a == b) == torch.equal(out[a], out[b])
    mixed = net(x, t, cond, text, preview_kind=["exact", "generated"]).sample
    assert torch.equal(mixed[0], out["exact"][0]) and torch.equal(mixed[1], out["generated"][1])
    idx = torch.tensor([PREVIEW_KINDS.index("exact"), PREVIEW_KINDS.index("generated")])
    assert torch.equal(net(x, t, cond, text, preview_kind=idx).sample, mixed)


def test_a_new_kind_embedding_is_zero_so_the_model_starts_without_it():
    net = Refiner.from_cfg(RefinerConfig(dim=32, depth=2, heads=2, kind_condition=True))
    assert not net.condition_embedder.kind_embedder.weight.any()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "kind_embedder" not in name:
                p.add_(0.05 * torch.randn_like(p))
    x, t, cond, text = inputs()
    assert torch.equal(net(x, t, cond, text).sample, net(x, t, cond, text, preview_kind="exact").sample)


def test_bad_kinds_are_clear_errors():
    net = kind_refiner()
    x, t, cond, text = inputs()
    with pytest.raises(ValueError, match=r"preview_kind must be one of \('exact', 'degraded', 'generated'\)"):
        net(x, t, cond, text, preview_kind="pooled")
    with pytest.raises(ValueError, match=r"\(2,\) long indices, got torch.int64 \(1,\)"):
        net(x, t, cond, text, preview_kind=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 3\)"):
        net(x, t, cond, text, preview_kind=torch.tensor([0, 3]))
    plain = Refiner.from_cfg(RefinerConfig(dim=32, depth=2, heads=2))
    with pytest.raises(ValueError, match="no kind condition"):
        plain(x, t, cond, text, preview_kind="exact")


def test_the_sampler_tells_the_kind_only_to_a_refiner_with_the_condition():
    x, _, cond, text = inputs()
    up = upsample(cond[..., ::2, ::2], (8, 8))
    net = kind_refiner()
    runs = {k: RefinerSampler(steps=2, preview_kind=k).refine(net, up, text=text) for k in ("exact", "generated")}
    assert not torch.equal(runs["exact"], runs["generated"])
    direct = RefinerSampler(steps=2).refine(lambda *a, **kw: net(*a, **kw, preview_kind="exact"), up, text=text)
    assert torch.equal(direct, runs["exact"])
    seen = []
    plain_fn = lambda x, t, c, txt: seen.append(1) or torch.zeros_like(x)  # noqa: E731 (takes no kind)
    RefinerSampler(steps=2, preview_kind="exact").refine(plain_fn, up, text=text)
    assert len(seen) == 2
    with pytest.raises(Exception, match="preview_kind 'blurry'"):
        RefinerSampler(preview_kind="blurry")


@pytest.mark.parametrize(
    "meta,kind",
    [
        ({"preview_kind": "degraded"}, "degraded"),
        ({"source": "generated", "reshift": {"switch": 20}, "schedule": {"steps": 20}}, "exact"),
        ({"source": "generated", "reshift": {"switch": 5}, "schedule": {"steps": 20}}, "generated"),
        ({"source": "video", "preview_mode": "degrade"}, "degraded"),
        ({"source": "video", "preview_mode": "repreview"}, "generated"),
        ({"source": "generated"}, "generated"),  # says neither: SURF's own kind
    ],
)
def test_kind_of_older_shards_is_inferred_from_their_metadata(meta, kind):
    assert preview_kind(meta) == kind


def test_an_unknown_recorded_kind_names_the_sample():
    with pytest.raises(ShardError, match="sample abc: preview kind 'sharp'"):
        preview_kind({"key": "abc", "preview_kind": "sharp"})


@pytest.fixture(scope="module")
def exact_pairs(tmp_path_factory):
    """8 tiny pairs whose preview is the finished target pooled (switch = steps), in 2 shards."""
    out = tmp_path_factory.mktemp("exact")
    cfg = {"base": "tiny", "out_dir": str(out), "height": 64, "width": 64, "frames": 9, "steps": 6}
    make_pairs(PairsConfig.from_dict({**cfg, "switch": 6, "num_pairs": 8, "shard_size": 4, "progress": False}))
    return out


def test_writers_record_the_kind_and_batches_carry_it(pairs, exact_pairs):
    gen = next(iter(read_shards(sorted(pairs.glob("*.tar"))[:1])))
    exact = next(iter(read_shards(sorted(exact_pairs.glob("*.tar"))[:1])))
    assert gen["meta"]["preview_kind"] == "generated" and exact["meta"]["preview_kind"] == "exact"
    b = collate([gen, exact] if gen["preview"].shape == exact["preview"].shape else [exact, exact])
    assert b["preview_kind"].dtype == torch.long and b["preview_kind"].shape == (2,)
    assert [PREVIEW_KINDS[i] for i in b["preview_kind"]] == [s["preview_kind"] for s in b["meta"]]


def test_training_tells_each_sample_its_kind_and_the_export_keeps_the_condition(pairs, exact_pairs, tmp_path):
    """Mixed generated and exact pairs with model.kind_condition=true: both seen kinds' embeddings move from zero,
    the unseen one (degraded) gets no gradient and stays zero; the export loads with the condition and records
    the sources' kinds."""
    cfg = compose_cfg(
        [
            "data=mixed",
            f"data.sources.generated.shards={pairs}",
            f"data.sources.real.shards={exact_pairs}",  # the second slot: any source
            "data.val_samples=0",
            f"run_dir={tmp_path}",
            "trainer.max_steps=8",
            "ckpt_every=8",
            "model.kind_condition=true",
            *FAST,
            *SHRINK,
        ]
    )
    assert train(cfg)["steps"] == 8
    net, meta = load_refiner(export(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "refiner"))
    assert net.config.kind_condition
    rows = net.condition_embedder.kind_embedder.weight.abs().sum(1)
    assert rows[PREVIEW_KINDS.index("exact")] > 0 and rows[PREVIEW_KINDS.index("generated")] > 0
    assert rows[PREVIEW_KINDS.index("degraded")] == 0
    assert meta["trained_on"]["preview_kinds"] == {"generated": "generated", "real": "exact"}


def test_surf_pipeline_tells_its_refiner_the_preview_is_generated(tmp_path):
    """A Refiner with kind_condition inside SurfPipeline: moving the `generated` embedding changes the video,
    moving the `exact` one does not."""
    from generate_golden import tiny_refiner

    from surf_train.inference.pipeline import SurfPipeline

    ref, _ = tiny_refiner("tiny", 32, tmp_path / "refiner")
    pipe = SurfPipeline.from_surf("tiny", str(ref), "cpu")
    net = Refiner.from_cfg(RefinerConfig(**{**pipe.refiner.cfg.to_dict(), "kind_condition": True}))
    net.load_state_dict(pipe.refiner.state_dict(), strict=False)
    kinds = SurfPipeline(**{**pipe.components, "refiner": net})
    call = dict(num_inference_steps=3, switch=1, refiner_steps=2, output_type="latent", height=64, width=64)
    call |= dict(num_frames=5, prefix_height=64, prefix_width=64)

    def video():
        return kinds("a red ball rolling", generator=torch.Generator().manual_seed(0), **call).frames

    before = video()
    emb = net.condition_embedder.kind_embedder.weight
    with torch.no_grad():
        emb[PREVIEW_KINDS.index("exact")] = 1.0
    assert torch.equal(video(), before)
    with torch.no_grad():
        emb[PREVIEW_KINDS.index("generated")] = 1.0
    assert not torch.allclose(video(), before, atol=1e-4)
