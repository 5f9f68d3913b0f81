"""SurfPipeline follows diffusers' conventions (issue 26): generator lists, negative prompt lists, prompt_embeds,
num_videos_per_prompt, step-end callbacks, attention_kwargs, a pipeline from its components alone, from_pipe, the
generic DiffusionPipeline load, and errors that name the call's arguments."""

import inspect
import json

import pytest
import torch
from diffusers import DiffusionPipeline, HunyuanVideoPipeline, WanPipeline
from generate_golden import tiny_refiner

from surf_train.base.components import FAMILY_DEFAULTS
from surf_train.common.errors import ConfigError
from surf_train.inference.pipeline import SurfPipeline

SIZE = dict(height=64, width=64, num_frames=5, prefix_height=64, prefix_width=64)
# paper: the switch draws fresh noise; the tiny Refiner's start-point noise is 0.05 (its export's bridge)
CALL = dict(num_inference_steps=3, switch=1, refiner_steps=2, rule="paper", output_type="latent", **SIZE)
PROMPTS = ["a red ball rolling", "a cat playing piano"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    ref, _ = tiny_refiner("tiny", 32, tmp_path_factory.mktemp("ref") / "refiner")
    return SurfPipeline.from_surf("tiny", str(ref), "cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of batched against single matmuls (float32)."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_list_of_generators_draws_each_video_as_its_own_call(pipe):
    """Video i of a batched call with generators [g0, g1] is the call of prompt i alone with g_i: the start noise,
    the switch's fresh noise and the Refiner's start-point noise are all drawn per video."""
    assert pipe.sampler.start_noise > 0
    both = pipe(PROMPTS, generator=[gen(3), gen(8)], **CALL).frames
    for i, seed in enumerate((3, 8)):
        assert close(both[i : i + 1], pipe(PROMPTS[i], generator=gen(seed), **CALL).frames)
    assert not close(both[0:1], pipe(PROMPTS[0], generator=gen(8), **CALL).frames)
    with pytest.raises(ConfigError, match="generator: a list of 1 generators for a batch of 2"):
        pipe(PROMPTS, generator=[gen(3)], **CALL)


def test_a_list_of_negative_prompts_one_per_prompt(pipe):
    base = dict(CALL, mode="baseline")
    negs = ["blurry", "static, low quality"]
    both = pipe(PROMPTS, negative_prompt=negs, generator=[gen(1), gen(2)], **base).frames
    for i in range(2):
        one = pipe(PROMPTS[i], negative_prompt=negs[i], generator=gen(i + 1), **base).frames
        assert close(both[i : i + 1], one)
    other = pipe(PROMPTS[1], negative_prompt=negs[0], generator=gen(2), **base).frames
    assert not close(both[1:2], other)
    with pytest.raises(ConfigError, match="negative_prompt: 1 negative prompts for 2 prompts"):
        pipe(PROMPTS, negative_prompt=negs[:1], **base)


def test_prompt_embeds_give_the_prompt_path(pipe):
    pos, neg = pipe.encode_prompt(PROMPTS, negative_prompt="blurry")
    assert pos.shape == neg.shape == (2, pipe.spec.max_sequence_length, 32)
    want = pipe(PROMPTS, negative_prompt="blurry", generator=gen(4), **CALL).frames
    got = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, generator=gen(4), **CALL).frames
    assert torch.equal(got, want)
    # without negative_prompt_embeds the negative branch is encoded from negative_prompt, as WanPipeline does
    assert torch.equal(pipe(prompt_embeds=pos, negative_prompt="blurry", generator=gen(4), **CALL).frames, want)
    with pytest.raises(ConfigError, match="either prompt or prompt_embeds"):
        pipe(PROMPTS, prompt_embeds=pos, **CALL)


def test_num_videos_per_prompt(pipe):
    """Each prompt's videos in a row (as diffusers repeats the embeddings); with one generator they differ, with a
    list of generators video j is the single call with generator j."""
    out = pipe(PROMPTS, num_videos_per_prompt=2, generator=gen(0), **CALL).frames
    assert out.shape == (4, 16, 2, 8, 8)
    assert not close(out[0], out[1])
    same = pipe(PROMPTS, num_videos_per_prompt=2, generator=[gen(5), gen(5), gen(6), gen(7)], **CALL).frames
    assert close(same[0], same[1]) and not close(same[2], same[3])
    for j, (p, seed) in enumerate([(0, 5), (1, 6), (1, 7)], start=1):
        assert close(same[j : j + 1], pipe(PROMPTS[p], generator=gen(seed), **CALL).frames)
    pos, neg = pipe.encode_prompt(PROMPTS, num_videos_per_prompt=3)
    assert pos.shape[0] == neg.shape[0] == 6 and torch.equal(pos[0], pos[2]) and not torch.equal(pos[2], pos[3])


def test_a_step_end_callback_sees_every_step_and_changes_the_latents(pipe):
    assert pipe._callback_tensor_inputs == ["latents", "prompt_embeds", "negative_prompt_embeds"]
    seen = []

    def record(p, i, t, kw):
        seen.append((i, tuple(kw["latents"].shape)))
        return kw

    plain = pipe(PROMPTS[0], generator=gen(2), callback_on_step_end=record, **CALL).frames
    # 3 base-model steps (1 at the prefix's latent 8x8, 2 at the preview's 4x4), then 2 Refiner steps at 8x8
    assert [i for i, _ in seen] == list(range(pipe.num_timesteps)) == list(range(5))
    assert [s[-1] for _, s in seen] == [8, 4, 4, 8, 8]
    assert torch.equal(plain, pipe(PROMPTS[0], generator=gen(2), **CALL).frames)  # a no-op callback changes nothing

    def halve_at(step):
        def cb(p, i, t, kw):
            return {"latents": kw["latents"] * 0.5} if i == step else kw

        return cb

    assert not torch.equal(plain, pipe(PROMPTS[0], generator=gen(2), callback_on_step_end=halve_at(1), **CALL).frames)

    def zero_last(p, i, t, kw):
        return {"latents": torch.zeros_like(kw["latents"])} if i == p.num_timesteps - 1 else kw

    assert pipe(PROMPTS[0], generator=gen(2), callback_on_step_end=zero_last, **CALL).frames.abs().sum() == 0
    with pytest.raises(ConfigError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPTS[0], callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"], **CALL)


def test_a_callback_that_raises_the_guidance_changes_the_next_steps(pipe):
    def more_guidance(p, i, t, kw):
        p._guidance_scale += 1.0
        return kw

    base = dict(CALL, mode="baseline", guidance_scale=2.0)
    out = pipe(PROMPTS[0], generator=gen(1), callback_on_step_end=more_guidance, **base).frames
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps == 5.0
    assert not torch.equal(out, pipe(PROMPTS[0], generator=gen(1), **base).frames)


def test_attention_kwargs_reach_the_base_transformer(pipe, monkeypatch):
    seen = []
    forward = type(pipe.transformer).forward

    def spy(self, *a, **k):
        seen.append(k.get("attention_kwargs"))
        return forward(self, *a, **k)

    monkeypatch.setattr(type(pipe.transformer), "forward", spy)
    a = pipe(PROMPTS[0], generator=gen(1), attention_kwargs={"scale": 1.0}, **CALL).frames
    assert seen and all(k == {"scale": 1.0} for k in seen) and pipe.attention_kwargs == {"scale": 1.0}
    seen.clear()
    b = pipe(PROMPTS[0], generator=gen(1), **CALL).frames
    assert seen and all(k is None for k in seen) and torch.equal(a, b)  # no LoRA layers: scale 1 changes nothing


def test_a_pipeline_from_its_components_alone(pipe):
    """SurfPipeline(**pipe.components) reads the family and the geometry off the components; the constants no
    component holds are the family pipeline's own defaults, so given explicitly the calls agree exactly. The
    Refiner carries its sampler settings (`bridge`) from pipeline to pipeline."""
    again = SurfPipeline(**pipe.components)
    assert again.config.bridge == pipe.config.bridge and again.sampler.start_noise == 0.05
    spec, base = again.spec, pipe.spec
    assert type(again.base) is type(pipe.base) and spec.family == "wan" and spec.geometry == base.geometry
    assert (spec.native_size, spec.guidance, spec.max_sequence_length) == ((480, 832), 5.0, 512)
    assert set(again.components) == set(pipe.components) and again.refiner is pipe.refiner
    given = dict(CALL, guidance_scale=base.guidance, negative_prompt=base.negative_prompt)
    given["max_sequence_length"] = base.max_sequence_length
    a = pipe(PROMPTS[0], generator=gen(6), **given).frames
    assert torch.equal(a, again(PROMPTS[0], generator=gen(6), **given).frames)
    # the components alone of a saved pipeline load back as they were saved (the read-off spec is in its config)
    assert again.config.base_spec["native_size"] == [480, 832]


def test_family_defaults_are_the_pipelines_own():
    for family, cls in (("wan", WanPipeline), ("hunyuan", HunyuanVideoPipeline)):
        p = inspect.signature(cls.__call__).parameters
        d = FAMILY_DEFAULTS[family]
        assert d["native_size"] == (p["height"].default, p["width"].default), family
        assert (d["native_frames"], d["guidance"]) == (p["num_frames"].default, p["guidance_scale"].default)
        assert d["max_sequence_length"] == p["max_sequence_length"].default


def test_from_pipe_keeps_every_component(pipe):
    other = SurfPipeline.from_pipe(pipe)
    for name in ("transformer", "vae", "refiner", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(other, name) is getattr(pipe, name), name
    assert other.spec == pipe.spec and other.config.bridge == pipe.config.bridge
    assert torch.equal(
        other(PROMPTS[0], generator=gen(2), **CALL).frames, pipe(PROMPTS[0], generator=gen(2), **CALL).frames
    )


def test_diffusion_pipeline_loads_a_saved_surf_pipeline(pipe, tmp_path):
    """diffusers' route for a pipeline class outside diffusers: `_class_name` [module, class] and the module saved
    with the directory, loaded by DiffusionPipeline.from_pretrained(dir, trust_remote_code=True); offline."""
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == ["surf_pipeline", "SurfPipeline"]
    assert (tmp_path / "saved" / "surf_pipeline.py").is_file()
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # diffusers runs no saved code unless told
        DiffusionPipeline.from_pretrained(tmp_path / "saved")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(loaded) is SurfPipeline and loaded.spec == pipe.spec
    own = SurfPipeline.from_pretrained(tmp_path / "saved")  # its own class: no code from the directory runs
    want = pipe(PROMPTS[0], generator=gen(7), **CALL).frames
    for p in (loaded, own):
        assert torch.equal(p(PROMPTS[0], generator=gen(7), **CALL).frames, want)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(num_inference_steps=0), "num_inference_steps=0: needs at least 1"),
        (dict(switch=9), r"switch=9 must be in \[0, num_inference_steps=3\]"),
        (dict(refiner_steps=0), "refiner_steps=0"),
        (dict(rule="fast"), "rule='fast'"),
        (dict(mode="fast"), "mode='fast'"),
        (dict(height=60), "height=60 must be a positive multiple of 16"),
        (dict(preview_width=24), "preview_width=24 must be a positive multiple of 16"),
        (dict(num_frames=0), "num_frames=0 must be >= 1"),
        (dict(num_frames=6), "num_frames=6 must be 4"),
    ],
)
def test_errors_name_the_arguments_not_the_command_line_flags(pipe, kw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        pipe(PROMPTS[0], **{**CALL, **kw})
    assert "--" not in str(e.value)


def test_acceleration_errors_name_its_fields(pipe):
    from surf_train.base import Acceleration

    with pytest.raises(ConfigError, match="cache_threshold=-1") as e:
        pipe(PROMPTS[0], acceleration=Acceleration(cache_threshold=-1), **CALL)
    assert "--" not in str(e.value)


def test_a_pipeline_of_the_text_encoders_alone_encodes_prompts(pipe):
    """As diffusers' encode_prompt test builds it: every other component None."""
    text_only = SurfPipeline(pipe.tokenizer, pipe.text_encoder, None, None, None, base_spec=pipe.config.base_spec)
    assert all(torch.equal(a, b) for a, b in zip(text_only.encode_prompt(PROMPTS), pipe.encode_prompt(PROMPTS)))
    with pytest.raises(ConfigError, match="no transformer, vae, scheduler"):
        text_only(PROMPTS[0], **CALL)


@pytest.mark.slow
def test_regional_compilation_of_the_pipeline_gives_the_eager_videos(tmp_path):
    """compile_repeated_blocks compiles the base transformer's and the Refiner's blocks; the SURF output (base
    prefix, preview, Refiner) equals the eager pipeline's within float32 tolerance."""
    ref, _ = tiny_refiner("tiny", 32, tmp_path / "refiner")
    eager = SurfPipeline.from_surf("tiny", str(ref), "cpu")
    compiled = SurfPipeline.from_surf("tiny", str(ref), "cpu")
    compiled.compile_repeated_blocks()
    for m in (compiled.transformer, compiled.refiner):
        blocks = [b for b in m.modules() if type(b).__name__ in m._repeated_blocks]
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    a = eager("a red ball rolling", generator=gen(0), **CALL).frames
    b = compiled("a red ball rolling", generator=gen(0), **CALL).frames
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
