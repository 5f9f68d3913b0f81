"""`surf-generate --mode baseline` is the base model's own pipeline: same latents as WanPipeline /
HunyuanVideoPipeline(output_type="latent", latents=the same noise), for FlowMatchEuler and for UniPC configured
as the Wan 2.1 diffusers repositories ship it, and for the two-expert Wan 2.2 (WanPipeline with transformer_2,
boundary_ratio and guidance_scale_2). diffusers' pipeline is the external reference."""

import dataclasses

import pytest
import torch

from surf_train.base import BaseSpec, load_base_model
from surf_train.base.adapter import BaseModel
from surf_train.generate import GenerateConfig, generate

TOL = 1e-5  # relative L2 difference, float32
# tiny Wan and HunyuanVideo built from configs; the toy base loaded with from_pretrained (its scheduler/ folder)
CASES = {
    "tiny": dict(height=64, width=64, frames=9),
    "tiny_hunyuan": dict(height=64, width=64, frames=9),
    "tiny_wan22": dict(height=64, width=64, frames=9),  # two experts: 3 of the 6 steps on each
    "toy": dict(height=32, width=32, frames=5),
}
PROMPT = "a red ball rolling across a wooden floor"


def pipeline_latent(model, noise, steps, size):
    spec, kw = model.spec, {}
    if spec.family == "wan":
        kw = dict(negative_prompt=spec.negative_prompt)
        if spec.boundary is not None:
            kw["guidance_scale_2"] = spec.guidance_2
    elif spec.prompt_template is not None:
        kw = dict(prompt_template=dict(spec.prompt_template))
    return model.pipe(
        PROMPT,
        height=size["height"],
        width=size["width"],
        num_frames=size["frames"],
        num_inference_steps=steps,
        guidance_scale=spec.guidance,
        latents=noise.clone(),
        output_type="latent",
        max_sequence_length=spec.max_sequence_length,
        return_dict=False,
        **kw,
    )[0]


@pytest.mark.parametrize("scheduler", ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("base", list(CASES))
def test_baseline_equals_the_pipeline(base, scheduler, tmp_path, monkeypatch):
    size, steps, seed = CASES[base], 6, 3
    decoded = []
    real_decode = BaseModel.vae_decode
    monkeypatch.setattr(BaseModel, "vae_decode", lambda self, z: decoded.append(z.clone()) or real_decode(self, z))
    rep = generate(
        GenerateConfig(
            base=base,
            mode="baseline",
            prompts=[PROMPT],
            seeds=[seed],
            steps=steps,
            scheduler=scheduler,
            prefix_height=size["height"],
            prefix_width=size["width"],
            out_dir=str(tmp_path),
            progress=False,
            **size,
        )
    )[0]
    assert rep["calls"] == {"full_res": steps}
    ours = decoded[0]
    model = load_base_model(dataclasses.replace(BaseSpec.from_name(base), scheduler=scheduler), "cpu")
    assert type(model.pipe.scheduler).__name__ == scheduler
    c, f, h, w = model.geometry.latent_shape(size["frames"], size["height"], size["width"])
    noise = torch.randn((1, c, f, h, w), generator=torch.Generator().manual_seed(seed))  # generate's noise
    ref = pipeline_latent(model, noise, steps, size)
    diff = float((ours - ref).norm() / ref.norm())
    print(f"{base} {scheduler}: relative difference {diff:.2e}")
    assert diff <= TOL
    # and the difference is not trivially small: the two schedulers give different videos from the same noise
    other = "UniPCMultistepScheduler" if scheduler.startswith("Flow") else "FlowMatchEulerDiscreteScheduler"
    model2 = load_base_model(dataclasses.replace(BaseSpec.from_name(base), scheduler=other), "cpu")
    ref2 = pipeline_latent(model2, noise, steps, size)
    assert float((ref2 - ref).norm() / ref.norm()) > 100 * TOL


def test_unipc_is_configured_like_the_wan_repositories(tiny_wan):
    """The UniPC that `scheduler: UniPCMultistepScheduler` builds from a FlowMatchEuler config has the settings
    of Wan-AI/Wan2.1-T2V-*-Diffusers' scheduler_config.json (flow prediction and sigmas, order 2, bh2)."""
    from surf_train.base.sampling import convert_scheduler

    u = convert_scheduler(tiny_wan.pipe.scheduler, "UniPCMultistepScheduler").config
    want = dict(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
        num_train_timesteps=1000,
        use_karras_sigmas=False,
    )
    assert {k: u[k] for k in want} == want


@pytest.mark.parametrize("base", ["tiny", "tiny_hunyuan", "tiny_wan22"])
def test_baseline_with_first_block_cache_equals_the_pipeline_with_it(base):
    """The cache plug-in: our loop opens the cache contexts the pipeline opens, so with diffusers' FirstBlockCache
    on the transformer both give the same latents, and it really skips (the output differs from no cache)."""
    from diffusers.hooks import FirstBlockCacheConfig

    from surf_train.base.sampling import sample

    size, steps = CASES[base], 8
    model = load_base_model(BaseSpec.from_name(base), "cpu")
    c, f, h, w = model.geometry.latent_shape(size["frames"], size["height"], size["width"])
    noise = torch.randn((1, c, f, h, w), generator=torch.Generator().manual_seed(0))
    plain = pipeline_latent(model, noise, steps, size)
    model.enable_cache(0.2)
    ours = sample(model.velocity_fn(model.encode_prompt([PROMPT])), noise, model.schedule(steps))
    skipped = 1 - model.meter.block_fraction(None, model.block_lists)
    model.disable_cache()
    for net in model.experts.values():  # each expert with its own cache, as the pipeline's loop uses them
        net.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    ref = pipeline_latent(model, noise, steps, size)
    model.disable_cache()
    assert float((ours - ref).norm() / ref.norm()) <= TOL
    assert skipped > 0.1 and float((ref - plain).norm() / plain.norm()) > 1e-4
