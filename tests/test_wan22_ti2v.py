"""Wan 2.2 TI2V-5B (text-to-video) exactly as WanPipeline(expand_timesteps=True): the baseline's latents, the
per-token timesteps, the 48-channel VAE normalisation, a saved-and-reloaded directory, the reshift properties,
the 16x size grid, the Refiner end to end, and the FLOPs row. diffusers' pipeline is the external reference."""

import dataclasses

import numpy as np
import pytest
import torch
from test_train import FAST, SHRINK, compose_cfg

from surf_train import cost
from surf_train.base import BaseSpec, load_base_model
from surf_train.base.adapter import BaseModel
from surf_train.base.sampling import PreviewPlan, pair_sample, preview_sample, resize_latent, sample
from surf_train.base.vae import to_frames
from surf_train.common.errors import ConfigError
from surf_train.generate import GenerateConfig, generate

TOL = 1e-5  # relative L2 difference, float32
BASE = "tiny_wan22_ti2v"
SIZE = dict(height=128, width=128, frames=9)  # latent (48, 3, 8, 8): 4x4 tokens
LOW = dict(height=64, width=64)  # latent 4x4: 2x2 tokens
PROMPT = "a red ball rolling across a wooden floor"
SCHEDULERS = ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ti2v():
    return load_base_model(BaseSpec.from_name(BASE), "cpu")


def with_scheduler(name):
    return load_base_model(dataclasses.replace(BaseSpec.from_name(BASE), scheduler=name), "cpu")


def pipeline_out(model, noise, steps, height, width, output_type="latent"):
    spec = model.spec
    return model.pipe(
        PROMPT,
        negative_prompt=spec.negative_prompt,
        height=height,
        width=width,
        num_frames=SIZE["frames"],
        num_inference_steps=steps,
        guidance_scale=spec.guidance,
        latents=noise.clone(),
        output_type=output_type,
        max_sequence_length=spec.max_sequence_length,
        return_dict=False,
    )[0]


def timesteps_seen(model):
    """Records the timestep every transformer call receives (a forward pre-hook; remove with .remove())."""
    seen = []
    hook = model.pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["timestep"].clone()), with_kwargs=True
    )
    return seen, hook


def noise_for(model, seed, height, width):
    c, f, h, w = model.geometry.latent_shape(SIZE["frames"], height, width)
    return torch.randn((1, c, f, h, w), generator=torch.Generator().manual_seed(seed))


def test_the_conf_entries_are_the_pipeline_they_load(ti2v):
    assert ti2v.expand_timesteps and ti2v.pipe.config.expand_timesteps  # read from the pipeline, not the yaml
    assert type(ti2v.pipe.scheduler).__name__ == "UniPCMultistepScheduler" and ti2v.shift == 5.0
    assert ti2v.pipe.vae.config.z_dim == 48 and ti2v.pipe.vae_scale_factor_spatial == 16
    spec = BaseSpec.from_name("wan2.2_ti2v_5b")
    assert spec.pretrained == "Wan-AI/Wan2.2-TI2V-5B-Diffusers" and spec.native_size == (704, 1280)
    assert (spec.channels, spec.stride_t, spec.stride_s, spec.patch_t, spec.patch_s) == (48, 4, 16, 1, 2)
    assert (spec.native_frames, spec.fps, spec.guidance, spec.shift, spec.scheduler) == (121, 24, 5.0, None, None)
    assert spec.geometry.latent_shape(121, 704, 1280) == (48, 31, 44, 80)
    with pytest.raises(ConfigError, match="tiny='nope'"):
        BaseSpec.from_dict({**dataclasses.asdict(spec), "tiny": "nope"})


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_baseline_equals_the_pipeline(scheduler, tmp_path, monkeypatch):
    """surf-generate --mode baseline == WanPipeline(expand_timesteps=True) on the same noise, and every transformer
    call gets the pipeline's per-token timestep: (B, F * H/2 * W/2), the scheduler's t at every token."""
    steps, seed = 6, 3
    decoded, calls = [], []
    real_decode, real_call = BaseModel.vae_decode, BaseModel._call
    monkeypatch.setattr(BaseModel, "vae_decode", lambda self, z: decoded.append(z.clone()) or real_decode(self, z))
    monkeypatch.setattr(
        BaseModel,
        "_call",
        lambda self, name, step, **kw: calls.append(kw["timestep"]) or real_call(self, name, step, **kw),
    )
    cfg = dict(base=BASE, mode="baseline", prompts=[PROMPT], seeds=[seed], steps=steps, scheduler=scheduler)
    prefix = dict(prefix_height=SIZE["height"], prefix_width=SIZE["width"])
    rep = generate(GenerateConfig(**cfg, **prefix, out_dir=str(tmp_path), progress=False, **SIZE))[0]
    assert rep["calls"] == {"full_res": steps}
    model = with_scheduler(scheduler)
    seen, hook = timesteps_seen(model)
    ref = pipeline_out(
        model, noise_for(model, seed, SIZE["height"], SIZE["width"]), steps, SIZE["height"], SIZE["width"]
    )
    hook.remove()
    diff = rel(decoded[0], ref)
    print(f"{BASE} {scheduler}: relative difference {diff:.2e}")
    assert diff <= TOL
    assert len(calls) == len(seen) == 2 * steps  # CFG: two calls a step
    for ours, theirs in zip(calls, seen):
        assert ours.shape == theirs.shape == (1, 3 * 4 * 4) and ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)


def test_wan21_keeps_one_timestep_per_sample(tiny_wan):
    assert not tiny_wan.expand_timesteps
    from surf_train.base.sampling import Step

    x = torch.zeros(2, 16, 3, 8, 8)
    assert tiny_wan._timestep(x, Step(0.5, torch.tensor(500.0), 0, 1)).shape == (2,)


def test_reloaded_directory_equals_the_pipeline_and_decodes_as_it_does(ti2v, tmp_path):
    """save_pretrained -> a conf/base-style entry with `pretrained: <dir>` -> from_pretrained: expand_timesteps
    comes back from model_index.json, the baseline equals the reloaded pipeline's latents, and our decode with the
    48-channel latents_mean/std equals the pipeline's own decoded frames."""
    ti2v.pipe.save_pretrained(tmp_path)
    spec = dataclasses.replace(BaseSpec.from_name(BASE), pretrained=str(tmp_path), tiny=None)
    model = load_base_model(spec, "cpu")
    assert model.expand_timesteps and model.pipe.vae.config.latents_std == ti2v.pipe.vae.config.latents_std
    noise = noise_for(model, 5, SIZE["height"], SIZE["width"])
    ours = sample(model.velocity_fn(model.encode_prompt([PROMPT])), noise, model.schedule(4))
    ref = pipeline_out(model, noise, 4, SIZE["height"], SIZE["width"])
    assert rel(ours, ref) <= TOL
    in_memory = sample(ti2v.velocity_fn(ti2v.encode_prompt([PROMPT])), noise, ti2v.schedule(4))
    assert rel(in_memory, ref) <= TOL
    frames = to_frames(model.vae_decode(ours), "np")  # (1, 9, 128, 128, 3) in [0, 1]
    want = pipeline_out(model, noise, 4, SIZE["height"], SIZE["width"], output_type="np")
    assert frames.shape == want.shape == (1, 9, 128, 128, 3)
    assert np.abs(frames - want).max() < 1e-5
    # the normalisation is not the identity: with mean 0 / std 1 the decode differs
    z = model.pipe.vae.config
    assert max(map(abs, z.latents_mean)) > 0.1 and min(z.latents_std) < 0.9
    back = model.vae_encode(model.vae_decode(ours))  # (1, 48, 3, 8, 8), normalised again
    assert back.shape == ours.shape


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_switch_zero_is_the_pipeline_at_low_resolution(scheduler):
    """Switch 0 with the paper rule: the preview is the pipeline's own run at the preview size from the fresh noise
    (the first level is 1, or 1 - 1e-6 for UniPC, so nothing of the start noise is kept)."""
    model, steps = with_scheduler(scheduler), 5
    noise = noise_for(model, 1, SIZE["height"], SIZE["width"])
    fresh = noise_for(model, 2, LOW["height"], LOW["width"])
    plan = PreviewPlan(model.schedule(steps), switch=0, preview_size=(4, 4), rule="paper")
    assert 1 - float(plan.sigmas[0]) < 2e-6  # UniPC's flow grid starts at 1 - 1e-6: a 1e-6 share of x0 is kept
    got = preview_sample(model.velocity_fn(model.encode_prompt([PROMPT])), noise, plan, fresh)
    want = pipeline_out(model, fresh, steps, LOW["height"], LOW["width"])
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_switch_at_the_end_is_the_native_run_then_pooled(scheduler):
    model, steps = with_scheduler(scheduler), 5
    noise = noise_for(model, 1, SIZE["height"], SIZE["width"])
    plan = PreviewPlan(model.schedule(steps), switch=steps, preview_size=(4, 4), rule="pool")
    preview, target = pair_sample(model.velocity_fn(model.encode_prompt([PROMPT])), noise, plan)
    native = pipeline_out(model, noise, steps, SIZE["height"], SIZE["width"])
    assert rel(target, native) <= TOL
    assert rel(preview, resize_latent(native, (4, 4), "area")) <= TOL


def test_size_grid_is_32_pixels():
    """VAE stride 16 x patch 2: 720 is off the grid (the 5B's 720p is 704x1280); the defaults: prefix = target =
    704x1280, preview 352x640 (latent 22x40, 11x20 tokens)."""
    from surf_train.data.pairs import PairsConfig
    from surf_train.inference.pipeline import plan_sizes

    spec = BaseSpec.from_name("wan2.2_ti2v_5b")
    sizes = plan_sizes(spec)
    assert sizes == {"target": (704, 1280), "prefix": (704, 1280), "preview": (352, 640)}
    assert plan_sizes(spec, 1280, 704)["preview"] == (640, 352)  # portrait
    # 480x832: half the height, 240, is off the grid; plan_sizes rounds 7.5 grid steps to 8 (half to even)
    assert plan_sizes(spec, 480, 832)["preview"] == (256, 416)
    with pytest.raises(ConfigError, match="height=720 must be a positive multiple of 32"):
        plan_sizes(spec, 720, 1280)
    with pytest.raises(ConfigError, match="multiple of 32"):
        spec.geometry.check(121, 360, 640, "preview")
    pairs = PairsConfig.from_dict({"base": "wan2.2_ti2v_5b", "out_dir": "unused"}).resolved()
    assert (pairs.height, pairs.width, pairs.frames, pairs.preview_height, pairs.preview_width) == (
        704,
        1280,
        121,
        352,
        640,
    )


def test_ti2v_refiner_preset_fits_the_5b_grid():
    from surf_train.models.refiner import Refiner, RefinerConfig
    from surf_train.models.windows import clamp_window

    cfg = RefinerConfig.preset("ti2v")
    assert (cfg.in_channels, tuple(cfg.patch_size), cfg.text_dim) == (48, (1, 2, 2), 4096)
    grid = cost.token_grid((48, 31, 44, 80), cfg.patch_size)
    assert grid == (31, 22, 40) and clamp_window(grid, cfg.window) == (4, 11, 10)
    assert grid[1] % cfg.window[1] == 0 and grid[2] % cfg.window[2] == 0  # no spatial padding at 704x1280
    with torch.device("meta"):
        n = sum(p.numel() for p in Refiner.from_cfg(cfg).parameters())
    from surf_train import CONF_DIR

    assert f"{n / 1e9:.2f}B parameters" in (CONF_DIR / "model" / "ti2v.yaml").read_text()  # the count it states


def test_pairs_train_export_and_surf_pipeline(tmp_path):
    """make_pairs on the tiny TI2V model -> 3 training steps -> export -> SurfPipeline (surf, preview, baseline)."""
    from surf_train.data.pairs import PairsConfig, make_pairs
    from surf_train.inference.pipeline import SurfPipeline
    from surf_train.training.export import export
    from surf_train.training.train import train

    pairs = tmp_path / "pairs"
    make_pairs(
        PairsConfig.from_dict(
            dict(base=BASE, out_dir=str(pairs), **SIZE, steps=4, switch=1, num_pairs=8, shard_size=4, progress=False)
        )
    )
    run = tmp_path / "run"
    overrides = [f"data.shards={pairs}", f"run_dir={run}", "trainer.max_steps=3", "ckpt_every=3"]
    train(compose_cfg([*overrides, "data.val_samples=0", *SHRINK, *FAST]))
    out = export(run / "checkpoints" / "last.ckpt", tmp_path / "refiner")
    pipe = SurfPipeline.from_surf(BASE, str(out), "cpu")
    assert pipe.refiner.cfg.in_channels == 48
    call = dict(height=SIZE["height"], width=SIZE["width"], num_frames=SIZE["frames"], num_inference_steps=3)
    for mode in ("surf", "preview", "baseline"):
        lat = pipe(
            PROMPT, generator=torch.Generator().manual_seed(0), mode=mode, switch=1, output_type="latent", **call
        )
        # every mode returns the target-size latent (preview: the 4x4 preview upsampled)
        assert tuple(lat.frames.shape) == (1, 48, 3, 8, 8) and torch.isfinite(lat.frames).all(), mode
    video = pipe(PROMPT, generator=torch.Generator().manual_seed(0), switch=1, refiner_steps=2, **call).frames
    assert video.shape == (1, 9, 128, 128, 3)
    # SurfPipeline builds its own WanPipeline around the modules: it keeps expand_timesteps, also saved and reloaded
    assert pipe.base.expand_timesteps and pipe.config.base_options["expand_timesteps"]
    pipe.save_pretrained(tmp_path / "surf")
    back = SurfPipeline.from_pretrained(tmp_path / "surf")
    assert back.base.expand_timesteps
    a = pipe(PROMPT, generator=torch.Generator().manual_seed(1), switch=1, output_type="latent", **call).frames
    b = back(PROMPT, generator=torch.Generator().manual_seed(1), switch=1, output_type="latent", **call).frames
    assert torch.equal(a, b)


# --- FLOPs --------------------------------------------------------------------------------------------------


def _count(fn) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@pytest.mark.parametrize("batch", [1, 2])
def test_per_token_time_embedding_flops_match_the_counter(ti2v, batch):
    net, latent, text_len = ti2v.pipe.transformer, (48, 3, 8, 12), 7
    x = torch.randn(batch, *latent)
    t = torch.full((batch, 3 * 4 * 6), 500.0)  # (B, seq_len) as WanPipeline with expand_timesteps passes it
    text = torch.randn(batch, text_len, net.config.text_dim)
    counted = _count(lambda: net(x, t, text, return_dict=False))
    cfg = {**net.config, "expand_timesteps": True}
    assert cost.total(cost.wan_flops(cfg, latent, text_len, batch)) == counted
    assert cost.total(cost.wan_flops(dict(net.config), latent, text_len, batch)) < counted  # one row per sample


def test_5b_row_matches_the_counter_on_meta():
    """The released TI2V-5B transformer at 704x1280x121 on the meta device (shapes only)."""
    from diffusers import WanTransformer3DModel

    arch = cost.BaseArch.from_name("wan2.2_ti2v_5b")
    latent = arch.latent(121, (1280, 704))
    assert latent == (48, 31, 44, 80)
    cfg = {k: v for k, v in arch.config.items() if k != "expand_timesteps"}
    with torch.device("meta"):
        net = WanTransformer3DModel(**cfg)
        x, t, text = torch.empty(1, *latent), torch.empty(1, 31 * 22 * 40), torch.empty(1, 512, 4096)
    assert 4.9e9 < sum(p.numel() for p in net.parameters()) < 5.1e9
    counted = _count(lambda: net(x, t, text, return_dict=False))
    assert cost.total(arch.flops(latent)) == counted


def test_generate_reports_the_per_token_time_embedding(ti2v, tmp_path):
    """surf-generate's FLOPs report counts TI2V's time embedding per token, as the pipeline runs it (2 steps x 2
    CFG branches at the target size), not once per sample."""
    rep = generate(
        GenerateConfig(
            base=BASE,
            mode="baseline",
            prompts=[PROMPT],
            seeds=[0],
            steps=2,
            switch=0,
            out_dir=str(tmp_path),
            progress=False,
            prefix_height=SIZE["height"],
            prefix_width=SIZE["width"],
            **SIZE,
        )
    )[0]
    latent, text_len, config = (48, 3, 8, 8), ti2v.spec.max_sequence_length, dict(ti2v.pipe.transformer.config)
    per_token = cost.total(cost.wan_flops({**config, "expand_timesteps": True}, latent, text_len))
    assert rep["flops"]["full_res"] == 4 * per_token
    assert cost.total(cost.wan_flops(config, latent, text_len)) < per_token
