"""SurfPipeline: save_pretrained / from_pretrained round trip bit for bit, output types, latents=, negative_prompt."""

import json

import numpy as np
import pytest
import torch
from generate_golden import tiny_refiner
from PIL import Image

from surf_train.common.errors import ConfigError
from surf_train.inference.pipeline import SurfPipeline

# base -> refiner text_dim, call sizes
BASES = {
    "tiny": (32, dict(height=64, width=64, num_frames=9)),
    "tiny_hunyuan": (16, dict(height=64, width=64, num_frames=9)),
    "toy": (0, dict(height=32, width=32, num_frames=5)),
}
CALL = dict(num_inference_steps=3, switch=1, refiner_steps=2)


@pytest.fixture(scope="module", params=list(BASES))
def surf(request, tmp_path_factory):
    base = request.param
    ref, _ = tiny_refiner(base, BASES[base][0], tmp_path_factory.mktemp("ref") / "refiner")
    return base, SurfPipeline.from_surf(base, str(ref), "cpu")


def run(pipe, base, seed=3, **kw):
    return pipe(
        "a red ball rolling", generator=torch.Generator().manual_seed(seed), **BASES[base][1], **{**CALL, **kw}
    ).frames


def test_save_and_load_round_trip_exactly(surf, tmp_path):
    base, pipe = surf
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == ["surf_pipeline", "SurfPipeline"] and index["refiner"] == [
        "surf_train.models.refiner",
        "Refiner",
    ]
    want = {"tokenizer", "text_encoder", "transformer", "vae", "scheduler"}
    want |= {"text_encoder_2", "tokenizer_2"} if base == "tiny_hunyuan" else set()
    assert want <= {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    assert index["base_spec"]["name"] == base and index["bridge"]["steps"] == 3
    back = SurfPipeline.from_pretrained(tmp_path / "pipe")
    assert type(back.base) is type(pipe.base) and back.spec == pipe.spec
    for mode in ("surf", "preview", "baseline"):
        a, b = run(pipe, base, mode=mode, output_type="latent"), run(back, base, mode=mode, output_type="latent")
        assert torch.equal(a, b), mode
    assert np.array_equal(run(pipe, base, rule="paper"), run(back, base, rule="paper"))


def test_output_types(surf):
    base, pipe = surf
    _, size = BASES[base]
    latent = run(pipe, base, output_type="latent")
    f_lat = (size["num_frames"] - 1) // pipe.spec.stride_t + 1
    s = pipe.spec.stride_s
    assert latent.shape == (1, pipe.spec.channels, f_lat, size["height"] // s, size["width"] // s)
    video = pipe.base.vae_decode(latent)  # (1, 3, F, H, W) in [-1, 1]
    frames = run(pipe, base)  # np: (B, F, H, W, 3) in [0, 1], surf-generate's former conversion exactly
    assert isinstance(frames, np.ndarray) and frames.shape == (1, size["num_frames"], size["height"], size["width"], 3)
    assert np.array_equal(frames[0], ((video[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).numpy())
    pt = run(pipe, base, output_type="pt")
    assert torch.equal(pt[0].permute(0, 2, 3, 1), torch.from_numpy(frames[0]))
    pil = run(pipe, base, output_type="pil")
    assert len(pil) == 1 and len(pil[0]) == size["num_frames"] and isinstance(pil[0][0], Image.Image)
    with pytest.raises(ConfigError, match="output_type"):
        run(pipe, base, output_type="mp4")


def test_latents_are_the_start_noise_and_prompts_batch(surf):
    base, pipe = surf
    plan = pipe.plan(
        **{
            "height": BASES[base][1]["height"],
            "width": BASES[base][1]["width"],
            "num_frames": BASES[base][1]["num_frames"],
        },
        num_inference_steps=3,
        switch=1,
    )
    g = torch.Generator().manual_seed(5)
    noise = torch.randn((1, pipe.spec.channels, plan.f_lat, *plan.lat["prefix"]), generator=g)
    a = run(pipe, base, seed=5, output_type="latent")
    g = torch.Generator().manual_seed(5)
    torch.randn(noise.shape, generator=g)  # the generator as it stands after drawing the start noise
    b = pipe("a red ball rolling", generator=g, latents=noise, output_type="latent", **BASES[base][1], **CALL).frames
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="latents"):
        run(pipe, base, latents=noise[:, :, :, :2])
    two = pipe(
        ["a red ball rolling", "a cat"],
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        **BASES[base][1],
        **CALL,
    ).frames
    assert two.shape[0] == 2


def test_negative_prompt(surf):
    base, pipe = surf
    if base == "tiny_hunyuan":
        with pytest.raises(ConfigError, match="negative_prompt"):
            run(pipe, base, negative_prompt="blurry")
        return
    a = run(pipe, base, output_type="latent", mode="baseline")
    same = run(pipe, base, output_type="latent", mode="baseline", negative_prompt=pipe.spec.negative_prompt)
    other = run(pipe, base, output_type="latent", mode="baseline", negative_prompt="a cat playing piano")
    assert torch.equal(a, same) and not torch.equal(a, other)


def test_surf_needs_a_refiner():
    pipe = SurfPipeline.from_surf("tiny", None, "cpu")
    with pytest.raises(ConfigError, match="needs a Refiner"):
        pipe("a cat", **BASES["tiny"][1], **CALL)
    assert pipe("a cat", mode="preview", output_type="latent", **BASES["tiny"][1], **CALL).frames.shape[0] == 1


def test_the_generation_benchmark_runs_over_the_pipeline_without_patching(tmp_path):
    """bench_generate reads its glue timings from generate_one's StageClock (no monkeypatching of generate)."""
    import importlib.util
    import os

    import surf_train.generate as G

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_generate.py")
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = dict(vars(G))
    threads = torch.get_num_threads()
    bench.main(
        [
            "--repeats",
            "1",
            "--steps",
            "3",
            "--switch",
            "1",
            "--refiner-steps",
            "2",
            "--no-thread-check",
            "--target",
            "32x32",
            "--prefix",
            "32x32",
            "--preview",
            "16x16",
            "--out",
            str(tmp_path / "g.json"),
        ]
    )
    torch.set_num_threads(threads)
    assert vars(G) == before  # nothing in surf_train.generate was replaced
    r = json.loads((tmp_path / "g.json").read_text())
    surf = r["runs"]["surf"][0]
    assert set(surf["stages_s"]) == {"text", "prefix", "low_res", "refine", "decode"}
    assert surf["mp4_s"] > 0 and surf["upsample_s"] > 0 and surf["sampler_glue_s"] > -1e-3
    assert r["calls"]["surf"] == {"prefix": 2, "low_res": 2}  # paper rule: one more call at the switch
    assert r["flops"]["surf"]["refine"] > 0


def test_refiner_sees_the_text_as_the_pairs_store_it(surf, monkeypatch):
    """At generation the Refiner gets each prompt's text exactly as make_pairs stores it for training
    (Cond.text: padding rows zero). HunyuanVideo's real Llama gives non-zero rows at padding with a mask (the tiny
    encoders happen to give zeros there), so its encoder is made to pad with noise here."""
    base, pipe = surf
    if not BASES[base][0]:
        pytest.skip("this Refiner takes no text")
    encode = pipe.base.encode_prompt

    def noisy_padding(*a, **k):
        cond = encode(*a, **k)
        if "mask" in cond.extra:  # rows the mask marks as padding: non-zero, as a real encoder leaves them
            pad = (cond.extra["mask"] == 0)[..., None]
            cond.embeds = torch.where(pad, torch.randn_like(cond.embeds), cond.embeds)
        return cond

    monkeypatch.setattr(pipe.base, "encode_prompt", noisy_padding)
    seen = []
    real = type(pipe.refiner).forward
    monkeypatch.setattr(type(pipe.refiner), "forward", lambda self, *a, **k: seen.append(a[3]) or real(self, *a, **k))
    prompts = ["a red ball rolling", "a blue square moving left on a gray background"]
    torch.manual_seed(0)
    pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="latent", **BASES[base][1], **CALL)
    torch.manual_seed(0)
    cond = noisy_padding(prompts)
    stored = torch.stack([cond.text(i) for i in range(len(prompts))]).float()  # what the shards hold
    assert seen and all(torch.equal(t.float(), stored) for t in seen)
