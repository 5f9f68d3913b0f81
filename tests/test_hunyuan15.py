"""HunyuanVideo-1.5 (family `hunyuan15`): the baseline equals diffusers' HunyuanVideo15Pipeline on the same noise,
built from configs and through a saved-and-reloaded directory; reshift's limits; the published constants;
pairs -> training -> export -> SurfPipeline on the tiny model; its FLOPs equal FlopCounterMode."""

import dataclasses
import json

import pytest
import torch
from test_train import FAST, SHRINK, compose_cfg
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from surf_train import cost
from surf_train.base import BaseSpec, load_base_model
from surf_train.base.sampling import PreviewPlan, pair_sample, preview_sample, resize_latent, sample
from surf_train.common.errors import ConfigError

TOL = 1e-5  # relative L2 difference, float32
SIZE = dict(height=32, width=32, frames=9)  # latent 4x5x8x8
PROMPTS = ['a sign that reads "OPEN" on a wooden door', "a red ball rolling across a wooden floor"]


@pytest.fixture(scope="module")
def tiny15():
    return load_base_model(BaseSpec.from_name("tiny_hunyuan15"), "cpu")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def noise_for(model, seed=3, b=1):
    shape = model.geometry.latent_shape(SIZE["frames"], SIZE["height"], SIZE["width"])
    return torch.randn((b, *shape), generator=torch.Generator().manual_seed(seed))


def pipeline_latent(model, prompts, noise, steps):
    """diffusers' own loop, its guider set to the base model's guidance."""
    model.pipe.guider = model.pipe.guider.new(guidance_scale=model.spec.guidance)
    return model.pipe(
        prompts,
        negative_prompt=[model.spec.negative_prompt] * len(prompts),  # a str is encoded once, not per prompt
        height=SIZE["height"],
        width=SIZE["width"],
        num_frames=SIZE["frames"],
        num_inference_steps=steps,
        latents=noise.clone(),
        output_type="latent",
        return_dict=False,
    )[0]


@pytest.mark.parametrize("scheduler", ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"])
def test_baseline_equals_the_pipeline(scheduler):
    spec = dataclasses.replace(BaseSpec.from_name("tiny_hunyuan15"), scheduler=scheduler)
    model = load_base_model(spec, "cpu")
    assert type(model.pipe.scheduler).__name__ == scheduler
    noise = noise_for(model, b=2)
    ours = sample(model.velocity_fn(model.encode_prompt(PROMPTS)), noise, model.schedule(6))
    ref = pipeline_latent(model, PROMPTS, noise, 6)
    print(f"tiny_hunyuan15 {scheduler}: relative difference {rel(ours, ref):.2e}")
    assert rel(ours, ref) <= TOL
    # CFG matters: guidance 1 (the guider's single branch) gives another video
    plain = sample(model.velocity_fn(model.encode_prompt(PROMPTS), guidance=1.0), noise, model.schedule(6))
    assert rel(plain, ref) > 100 * TOL


def test_saved_directory_through_a_conf_base_entry_equals_the_pipeline(tiny15, tmp_path):
    """The from_pretrained path real weights take: save_pretrained, then a conf/base-style record naming it."""
    tiny15.pipe.save_pretrained(tmp_path / "hy15")
    d = dataclasses.asdict(BaseSpec.from_name("tiny_hunyuan15"))
    spec = BaseSpec.from_dict({**d, "name": "saved_hunyuan15", "pretrained": str(tmp_path / "hy15")})
    loaded = load_base_model(spec, "cpu")
    assert type(loaded.pipe).__name__ == "HunyuanVideo15Pipeline" and loaded.pipe.guider.guidance_scale == 6.0
    noise = noise_for(loaded)
    ours = sample(loaded.velocity_fn(loaded.encode_prompt(PROMPTS[:1])), noise, loaded.schedule(5))
    assert rel(ours, pipeline_latent(loaded, PROMPTS[:1], noise, 5)) <= TOL
    built = sample(tiny15.velocity_fn(tiny15.encode_prompt(PROMPTS[:1])), noise, tiny15.schedule(5))
    assert rel(ours, built) <= TOL


def test_encoders_masks_and_the_refiners_text(tiny15):
    cond = tiny15.encode_prompt(PROMPTS)
    e, L = cond.extra, tiny15.spec.max_sequence_length
    assert cond.embeds.shape == (2, L, 16) and e["mask"].shape == (2, L)
    # Qwen: right padding, 1 on real tokens; the glyph encoder only sees quoted text ("OPEN"), else zero rows
    assert e["mask"][:, 0].all() and not e["mask"][:, -1].any()
    assert e["mask_2"][0].sum() > 0 and e["mask_2"][1].sum() == 0 and e["embeds_2"][1].abs().sum() == 0
    assert e["neg_mask_2"].sum() == 0 and cond.negative is not None
    # the Refiner's text: padding rows zeroed (the tiny Qwen's are zero already: its pad embedding is the zero
    # padding_idx row; a released Qwen's are not), real rows untouched
    real = int(e["mask"][1].sum())
    text = cond.text(1)
    assert text[real:].abs().sum() == 0 and torch.equal(text[:real], cond.embeds[1, :real])


def test_cfg_is_the_guiders_combination(tiny15):
    cond = tiny15.encode_prompt(PROMPTS[:1])
    x = noise_for(tiny15)
    v_pos = tiny15.velocity(x, 0.5, cond, guidance=1.0)
    v_neg = tiny15.velocity(x, 0.5, dataclasses.replace(cond, embeds=cond.negative, extra=_neg(cond)), guidance=1.0)
    v = tiny15.velocity(x, 0.5, cond, guidance=4.0)
    assert torch.allclose(v, v_neg + 4.0 * (v_pos - v_neg), atol=1e-5) and not torch.allclose(v_pos, v_neg)


def _neg(cond):
    e = cond.extra
    return {**e, "mask": e["neg_mask"], "embeds_2": e["neg_embeds_2"], "mask_2": e["neg_mask_2"]}


def test_reshift_limits(tiny15):
    """Switch 0 with `paper` is direct low-resolution sampling from the fresh noise; switch == steps is the native
    run, pooled."""
    vel = tiny15.velocity_fn(tiny15.encode_prompt(PROMPTS[:1]))
    noise, sched, low = noise_for(tiny15), tiny15.schedule(4), (4, 4)
    fresh = torch.randn((1, 4, 5, *low), generator=torch.Generator().manual_seed(9))
    got = preview_sample(vel, noise, PreviewPlan(sched, switch=0, preview_size=low, rule="paper"), fresh)
    assert rel(got, sample(vel, fresh, sched)) <= TOL
    plan = PreviewPlan(sched, switch=4, preview_size=low, rule="pool")
    preview, target = pair_sample(vel, noise, plan, fresh)
    native = sample(vel, noise, sched)
    assert torch.equal(target, native) and rel(preview, resize_latent(native, low, "area")) <= 1e-6


def test_published_constants_are_the_pipelines():
    """conf/base/hunyuan_video15_720p_t2v.yaml against diffusers' 1.5 classes (their defaults are the released
    architecture) and its pipeline's defaults."""
    import inspect

    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Pipeline
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    spec = BaseSpec.from_name("hunyuan_video15_720p_t2v")
    vae = {k: p.default for k, p in inspect.signature(AutoencoderKLHunyuanVideo15.__init__).parameters.items()}
    net = cost.HUNYUAN15_DEFAULTS
    assert (spec.channels, spec.stride_t, spec.stride_s) == (
        vae["latent_channels"],
        vae["temporal_compression_ratio"],
        vae["spatial_compression_ratio"],
    )
    assert (spec.patch_t, spec.patch_s, net["in_channels"], net["out_channels"]) == (1, 1, 65, 32)
    assert spec.native_frames == inspect.signature(HunyuanVideo15Pipeline.__call__).parameters["num_frames"].default
    default_hw = HunyuanVideo15ImageProcessor(vae_scale_factor=spec.stride_s).calculate_default_height_width(9, 16, 960)
    assert tuple(default_hw) == spec.native_size == (720, 1280)
    assert net["text_embed_dim"] == 3584 and compose_cfg(["+experiment=hunyuan15"]).model.text_dim == 3584


def test_flops_equal_the_counter_and_the_720p_row():
    from surf_train.base.tiny import tiny_hunyuan15_pipeline

    net = tiny_hunyuan15_pipeline().transformer.eval()
    latent, b, L = (4, 3, 6, 5), 2, 9
    x, t = torch.randn(b, 9, *latent[1:]), torch.full((b,), 500.0)
    text, mask = torch.randn(b, L, 16), torch.ones(b, L)
    mask[0, -2:] = 0  # padding is computed (masked), as in the pipeline
    text_2, mask_2 = torch.randn(b, 256, 32), torch.zeros(b, 256)
    mask_2[:, :3] = 1
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x, t, text, mask, None, text_2, mask_2, torch.zeros(b, 729, 12), return_dict=False)
    assert cost.total(cost.hunyuan15_flops(dict(net.config), latent, L, b)) == counter.get_total_flops()
    assert cost.total(cost.transformer_flops(net, latent, L, b)) == counter.get_total_flops()
    # the released 8.3B (diffusers' conversion script converts 54 blocks of 16 x 128); its forward picks valid text
    # tokens by value, so it cannot run on the meta device as the other published architectures do
    arch = cost.ARCH["hunyuan_video15_720p_t2v"]
    assert (arch["num_layers"], arch["num_attention_heads"] * arch["attention_head_dim"]) == (54, 2048)
    run = cost.run_costs(cost.RunSettings(model="hunyuan_video15_720p_t2v", frames=121))
    assert run["settings"]["cfg_factor"] == 2 and run["speedup"] > 5
    with pytest.raises(ConfigError, match="channels"):
        cost.hunyuan15_flops(cost.HUNYUAN15_DEFAULTS, (16, 31, 45, 80))


def test_pairs_train_export_and_surf_pipeline(tmp_path):
    """The tiny 1.5 model end to end: pairs, a few training steps (the experiment's sibling, shrunk), export, and
    SurfPipeline from the exported Refiner, saved and reloaded with its guider."""
    from surf_train.data.pairs import PairsConfig, make_pairs
    from surf_train.inference.pipeline import SurfPipeline
    from surf_train.training.export import export
    from surf_train.training.train import train

    pairs = tmp_path / "pairs"
    size = dict(height=32, width=32, frames=9, steps=4, switch=1)
    make_pairs(
        PairsConfig.from_dict(
            {"base": "tiny_hunyuan15", "out_dir": str(pairs), **size, "num_pairs": 6, "shard_size": 2}
            | {"progress": False}
        )
    )
    overrides = [f"data.shards={pairs}", f"run_dir={tmp_path}/run", "trainer=cpu", "trainer.max_steps=3"]
    overrides += ["ckpt_every=3", "data.num_workers=0", "data.val_samples=2", *SHRINK, *FAST, "data.batch_size=2"]
    s = train(compose_cfg(["+experiment=hunyuan15", *overrides, "model.text_dim=16", "model.in_channels=4"]))
    assert s["steps"] == 3
    out = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "refiner")
    pipe = SurfPipeline.from_surf("tiny_hunyuan15", str(out), "cpu")
    call = dict(height=32, width=32, num_frames=9, num_inference_steps=3, switch=1, refiner_steps=2)
    video = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **call).frames
    assert video.shape == (1, 9, 32, 32, 3)
    pipe.save_pretrained(tmp_path / "surf")
    index = json.loads((tmp_path / "surf" / "model_index.json").read_text())
    assert index["guider"][1] == "ClassifierFreeGuidance" and index["tokenizer_2"][0] is not None
    back = SurfPipeline.from_pretrained(tmp_path / "surf")
    for mode in ("surf", "baseline"):
        a = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), mode=mode, output_type="latent", **call)
        b = back(PROMPTS[0], generator=torch.Generator().manual_seed(0), mode=mode, output_type="latent", **call)
        assert torch.equal(a.frames, b.frames), mode
    neg = pipe(PROMPTS[0], negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **call).frames
    assert not (neg == video).all()  # a CFG family takes a negative prompt


def test_pairs_take_cfg_truncation_where_the_family_has_a_negative_branch():
    """HunyuanVideo-1.5 guides with a negative branch (its guider), so pairs may truncate CFG as Wan's do;
    HunyuanVideo embeds its guidance, so they may not."""
    from surf_train.data.pairs import PairsConfig

    PairsConfig.from_dict({"base": "tiny_hunyuan15", "cfg_stop": 2}).resolved()
    with pytest.raises(ConfigError, match="CFG truncation needs a CFG branch"):
        PairsConfig.from_dict({"base": "tiny_hunyuan", "cfg_stop": 2}).resolved()
