"""Wan 2.2 T2V-A14B: two experts switched at a timestep boundary, run exactly as WanPipeline runs them.

The baseline's equality with WanPipeline on the tiny two-expert model is in test_pipeline_equality.py; here: the
published repository layout saved and loaded through a conf/base entry, the gap one expert leaves, the reshift
properties, which expert runs each branch (from the schedules), pairs -> training -> export -> SurfPipeline."""

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from surf_train import CONF_DIR
from surf_train.base import BaseSpec, load_base_model
from surf_train.base.sampling import (
    PreviewPlan,
    Schedule,
    pair_sample,
    preview_sample,
    resize_latent,
    sample,
    with_shift,
)
from surf_train.base.wan import branch_experts
from surf_train.common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # relative L2 difference, float32
PROMPT = "a red ball rolling across a wooden floor"
SIZE = dict(height=64, width=64, num_frames=9)  # latent 16x3x8x8


def rel(a, b):
    return float((a - b).norm() / b.norm())


def noise_for(model, seed=0, hw=(8, 8), b=1):
    return torch.randn((b, 16, 3, *hw), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def wan22():
    return load_base_model(BaseSpec.from_name("tiny_wan22"), "cpu")


def reference(pipe, noise, steps, spec):
    """WanPipeline's own latent on the same noise, with the spec's two guidances."""
    return pipe(
        PROMPT,
        negative_prompt=spec.negative_prompt,
        **SIZE,
        num_inference_steps=steps,
        guidance_scale=spec.guidance,
        guidance_scale_2=spec.guidance_2,
        latents=noise.clone(),
        output_type="latent",
        max_sequence_length=spec.max_sequence_length,
        return_dict=False,
    )[0]


def test_spec_refuses_experts_it_cannot_run():
    d = yaml.safe_load((CONF_DIR / "base" / "tiny_wan22.yaml").read_text())
    with pytest.raises(ConfigError, match="boundary=1.5 needs family wan and 0 < boundary < 1"):
        BaseSpec.from_dict({**d, "boundary": 1.5})
    with pytest.raises(ConfigError, match="guidance_2 needs a boundary"):
        BaseSpec.from_dict({**d, "boundary": None})
    hy = yaml.safe_load((CONF_DIR / "base" / "tiny_hunyuan.yaml").read_text())
    with pytest.raises(ConfigError, match="needs family wan"):
        BaseSpec.from_dict({**hy, "boundary": 0.5})
    one = BaseSpec.from_name("wan2.1_t2v_14b")
    assert one.boundary is None and one.guidance_2 is None


def test_experts_differ_and_the_step_picks_one(wan22):
    """Different weights; transformer while t >= 875 with guidance 4, transformer_2 below with guidance 3."""
    m = wan22
    a, b = m.experts["transformer"].state_dict(), m.experts["transformer_2"].state_dict()
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
    assert m.boundary_timestep == 875.0 and m.guidances() == (4.0, 3.0) and m.guidances(1.0) == (1.0, 1.0)
    cond = m.encode_prompt([PROMPT])
    x = noise_for(m)
    for s, net, g in ((0.875, "transformer", 4.0), (0.874, "transformer_2", 3.0)):
        m.meter.reset()
        v = m.velocity(x, s, cond)
        t = torch.tensor(s * 1000.0).expand(1)
        pos, neg = (
            m.experts[net](hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]
            for e in (cond.embeds, cond.negative)
        )
        assert m.meter.experts == Counter({net: 2}) and torch.allclose(v, neg + g * (pos - neg), atol=1e-6)


def test_one_expert_is_not_the_pipeline(wan22, monkeypatch):
    """The gap the two experts close: transformer and guidance at every step end far from WanPipeline."""
    m, steps = wan22, 6
    noise = noise_for(m, seed=3)
    ref = reference(m.pipe, noise, steps, m.spec)
    cond = m.encode_prompt([PROMPT])
    ours = sample(m.velocity_fn(cond), noise, m.schedule(steps))
    monkeypatch.setattr(type(m), "expert", lambda self, t: "transformer")
    one = sample(m.velocity_fn(cond, guidance_2=m.spec.guidance), noise, m.schedule(steps))
    gap = rel(one, ref)
    print(f"two experts {rel(ours, ref):.2e}, transformer alone {gap:.2e}")
    assert rel(ours, ref) <= TOL and gap > 1e-2


def published_layout(root: Path) -> Path:
    """Two tiny experts built from configs with fixed seeds, saved as Wan-AI/Wan2.2-T2V-A14B-Diffusers lays out."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from surf_train.base.tiny import TINY_WAN_TRANSFORMER, tiny_wan_pipeline

    parts = tiny_wan_pipeline(seed=7).components
    experts = {}
    for name, seed in (("transformer", 11), ("transformer_2", 12)):
        torch.manual_seed(seed)
        experts[name] = WanTransformer3DModel(**TINY_WAN_TRANSFORMER)
    # the repository's scheduler as diffusers' convert_wan_to_diffusers.py writes it
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    keep = ("vae", "text_encoder", "tokenizer")
    pipe = WanPipeline(**{k: parts[k] for k in keep}, **experts, scheduler=sched, boundary_ratio=0.875)
    pipe.save_pretrained(root)
    return root


def test_published_layout_loads_through_a_conf_entry_and_equals_the_pipeline(tmp_path):
    from diffusers import WanPipeline

    root = published_layout(tmp_path / "Wan2.2-T2V-A14B-Diffusers")
    index = json.loads((root / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert (root / "transformer" / "config.json").is_file() and (root / "transformer_2" / "config.json").is_file()
    entry = yaml.safe_load((CONF_DIR / "base" / "wan2.2_t2v_a14b.yaml").read_text())
    tiny = yaml.safe_load((CONF_DIR / "base" / "tiny_wan22.yaml").read_text())
    entry.update(
        {k: tiny[k] for k in ("native_size", "native_frames", "negative_prompt", "max_sequence_length")},
        name="local_a14b",
        pretrained=str(root),
        shift=None,  # the repository's scheduler as saved (UniPC, flow_shift 3.0): 2 of 6 steps on transformer
        dtype="float32",
    )
    spec = BaseSpec.from_dict(entry)
    model = load_base_model(spec, "cpu")
    assert set(model.experts) == {"transformer", "transformer_2"}
    assert type(model.pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    noise, steps = noise_for(model, seed=5), 6
    ours = sample(model.velocity_fn(model.encode_prompt([PROMPT])), noise, model.schedule(steps))
    assert model.meter.experts == Counter({"transformer": 4, "transformer_2": 8})  # 2 + 4 steps, CFG
    ref = reference(WanPipeline.from_pretrained(root), noise, steps, spec)
    print(f"saved A14B layout: relative difference {rel(ours, ref):.2e}")
    assert rel(ours, ref) <= TOL
    for bad in ({"boundary": 0.9}, {"boundary": None, "guidance_2": None}):
        with pytest.raises(ConfigError, match="loaded \\(boundary_ratio, experts\\)"):
            load_base_model(dataclasses.replace(spec, **bad), "cpu")


def test_reshift_properties_hold_for_two_experts(wan22):
    """Switch 0 (`paper`) is direct low-resolution sampling; switch == steps is the native run, pooled."""
    m = wan22
    cond = m.encode_prompt([PROMPT])
    vel = m.velocity_fn(cond)
    noise, fresh = noise_for(m, seed=1), noise_for(m, seed=2, hw=(4, 4))
    sch = m.schedule(6)
    direct = sample(vel, fresh, sch)
    m.meter.reset()
    got = preview_sample(vel, noise, PreviewPlan(sch, switch=0, preview_size=(4, 4), rule="paper"), fresh)
    # + the velocity `paper` takes at the switch (native size, step 0: the high-noise expert), CFG doubling each
    assert m.meter.experts == Counter({"transformer": 8, "transformer_2": 6}) and rel(got, direct) <= TOL
    native = sample(vel, noise, sch)
    for rule in ("paper", "snr", "pool"):
        plan = PreviewPlan(sch, switch=6, preview_size=(4, 4), rule=rule)
        preview, target = pair_sample(vel, noise, plan, fresh)
        assert torch.equal(target, native)
        assert torch.allclose(preview, resize_latent(native, (4, 4), "area"), atol=1e-6)


@pytest.mark.parametrize("rule", ["pool", "paper"])
def test_the_reshifted_schedule_picks_the_preview_expert(wan22, rule):
    """The calls each expert really made equal those read off the schedules; with `pool` the preview hands over
    to the low-noise expert earlier than the target branch (its levels are lower), with `paper` at the same step."""
    m = wan22
    plan = PreviewPlan(m.schedule(6), switch=1, preview_size=(4, 4), rule=rule)
    runs = branch_experts(plan, (8, 8), m.spec.boundary)
    m.meter.reset()
    pair_sample(m.velocity_fn(m.encode_prompt([PROMPT])), noise_for(m), plan, noise_for(m, 2, (4, 4)))
    assert m.meter.experts == Counter({e: 2 * n for e, n in Counter(sum(runs.values(), [])).items()})
    high = {b: v.count("transformer") for b, v in runs.items()}
    assert (high["preview"] < high["target"]) == (rule == "pool") and high["prefix"] == 1


def published_plan(steps: int, switch: int, rule: str, preview=(45, 80)) -> PreviewPlan:
    """The A14B's schedule without its weights: the repository's UniPC with the conf/base shift."""
    from diffusers import UniPCMultistepScheduler

    spec = BaseSpec.from_name("wan2.2_t2v_a14b")
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    return PreviewPlan(Schedule(with_shift(sched, spec.shift), steps), switch, preview, rule)


def split(names: list[str]) -> str:
    parts = [f"{names.count(e)} {tag}" for e, tag in (("transformer", "H"), ("transformer_2", "L")) if e in names]
    return " + ".join(parts)


def test_published_expert_split_is_the_one_docs_state():
    """docs/method.md's table of which expert runs the prefix, the target branch and the preview, computed from the
    A14B's boundary and shift for the paper's 10 + 30 split and for the default 5 + 15: each row as computed."""
    spec = BaseSpec.from_name("wan2.2_t2v_a14b")
    doc = (ROOT / "docs" / "method.md").read_text()
    for steps, switch, rule in ((40, 10, "pool"), (40, 10, "snr"), (40, 10, "paper"), (20, 5, "pool")):
        runs = branch_experts(published_plan(steps, switch, rule), (90, 160), spec.boundary)
        # the generation sizes (480p prefix, 416x240 preview) halve the latent too: the same split
        assert runs == branch_experts(published_plan(steps, switch, rule, (30, 52)), (60, 104), spec.boundary)
        assert runs["prefix"] == ["transformer"] * switch  # the prefix is the high-noise expert's alone
        row = f"| {steps} = {switch} + {steps - switch}, `{rule}` | {split(runs['prefix'])} | "
        row += f"{split(runs['target'])} | {split(runs['preview'])} |"
        assert row in doc, row
    assert re.search(r"boundary 0\.875.*shift 12", doc)


def test_two_expert_pairs_train_export_and_generate(tmp_path):
    """make_pairs records the experts; +experiment=wan22 shrunk trains on them; its export drives SurfPipeline,
    which saves transformer_2 and loads back bit for bit."""
    from test_train import FAST, SHRINK, compose_cfg

    from surf_train.data.pairs import PairsConfig, make_pairs
    from surf_train.data.shards import list_shards, read_shards
    from surf_train.inference.pipeline import SurfPipeline
    from surf_train.training.export import export
    from surf_train.training.train import train

    pairs = tmp_path / "pairs"
    cfg = dict(base="tiny_wan22", out_dir=str(pairs), height=64, width=64, frames=9, steps=6, switch=1)
    make_pairs(PairsConfig.from_dict({**cfg, "num_pairs": 8, "shard_size": 4, "progress": False}))
    meta = next(read_shards(list_shards(pairs)))["meta"]
    experts = meta["schedule"]["experts"]
    assert experts["boundary"] == 0.875 and experts["guidance"] == {"transformer": 4.0, "transformer_2": 3.0}
    assert experts["prefix"] == {"transformer": 1} and sum(experts["target"].values()) == 5
    assert experts["preview"] == {"transformer": 1, "transformer_2": 4}  # pool: the low-noise expert sooner
    fp = json.loads((pairs / "pairs_config.json").read_text())
    assert fp["boundary"] == 0.875 and fp["guidance_2"] == 3.0

    full = compose_cfg(["+experiment=wan22"])
    assert full.module.decode_base == "wan2.2_t2v_a14b" and full.model.preset == "paper"
    assert full.trainer.precision == "bf16-mixed" and full.trainer.strategy.stage == 2
    run = [f"data.shards={pairs}", f"run_dir={tmp_path}/run", "trainer.max_steps=2", "data.num_workers=0"]
    s = train(compose_cfg(["+experiment=wan22", "trainer=cpu", *run, "data.val_samples=2", *SHRINK, *FAST]))
    assert s["steps"] == 2 and s["val_mse_refiner"] is not None
    refiner = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "refiner")

    pipe = SurfPipeline.from_surf("tiny_wan22", str(refiner), "cpu")
    call = dict(**SIZE, num_inference_steps=4, switch=1, refiner_steps=2, output_type="latent")
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).frames
    assert out.shape == (1, 16, 3, 8, 8) and set(pipe.base.meter.experts) == {"transformer", "transformer_2"}
    pipe.save_pretrained(tmp_path / "surf")
    index = json.loads((tmp_path / "surf" / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["base_spec"]["boundary"] == 0.875
    back = SurfPipeline.from_pretrained(tmp_path / "surf")
    assert torch.equal(out, back(PROMPT, generator=torch.Generator().manual_seed(0), **call).frames)


def test_generate_guidance_2_is_wan_pipelines_guidance_scale_2(wan22, tmp_path, monkeypatch):
    """`surf-generate --mode baseline --guidance-2 G` equals WanPipeline(guidance_scale_2=G) on the same noise, and
    G changes the video (the low-noise expert runs half of the 6 steps)."""
    from surf_train.base.adapter import BaseModel
    from surf_train.generate import GenerateConfig, generate

    decoded = []
    real_decode = BaseModel.vae_decode
    monkeypatch.setattr(BaseModel, "vae_decode", lambda self, z: decoded.append(z.clone()) or real_decode(self, z))
    size = dict(height=SIZE["height"], width=SIZE["width"], frames=SIZE["num_frames"])
    cfg = GenerateConfig(base="tiny_wan22", mode="baseline", prompts=[PROMPT], seeds=[3], steps=6, guidance_2=7.0)
    generate(dataclasses.replace(cfg, out_dir=str(tmp_path), progress=False, prefix_height=64, prefix_width=64, **size))
    noise = noise_for(wan22, seed=3)  # generate's start noise for seed 3
    spec = dataclasses.replace(wan22.spec, guidance_2=7.0)
    assert rel(decoded[0], reference(wan22.pipe, noise, 6, spec)) <= TOL
    assert rel(decoded[0], reference(wan22.pipe, noise, 6, wan22.spec)) > 100 * TOL
