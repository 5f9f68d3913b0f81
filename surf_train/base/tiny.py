"""Tiny, download-free Wan, HunyuanVideo and HunyuanVideo-1.5 components built from configs with a fixed seed.

Sizes follow diffusers' own unit tests. The tokenizer is a byte-level BPE trained in memory on a
fixed corpus, so the whole pipeline exists without any file or network access.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "a cat playing piano in a sunny room",
    "a video of waves on the beach at sunset",
    "low quality, blurry, static",
    "a red ball rolling across a wooden floor",
    "city street at night with neon lights",
    "a bird flying over a mountain lake",
]


# the tiny Wan transformer's config (sizes of diffusers' own unit tests)
TINY_WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
# the toy base's transformer: the tiny one, wider and deeper, on the toy VAE's 12 latent channels
# (data_prep/train_toy_base.py trains it; assets/toy_base/transformer/config.json is the shipped one)
TOY_WAN_TRANSFORMER = {
    **TINY_WAN_TRANSFORMER,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 12,
    "out_channels": 12,
    "text_dim": 64,
    "ffn_dim": 512,
    "num_layers": 4,
}


def tiny_tokenizer(specials=("<pad>", "</s>", "<unk>"), eos="</s>", bos=None, corpus=CORPUS, vocab_size=300):
    """PreTrainedTokenizerFast from a BPE trained in memory on `corpus` (deterministic)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    prefix = f"{bos} " if bos else ""
    special = [(eos, tok.token_to_id(eos))] + ([(bos, tok.token_to_id(bos))] if bos else [])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{prefix}$A {eos}", pair=f"{prefix}$A {eos} $B {eos}", special_tokens=special
    )
    kw = dict(pad_token="<pad>", eos_token=eos, unk_token="<unk>", **({"bos_token": bos} if bos else {}))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def tiny_wan_vae(seed: int = 0):
    """The tiny Wan VAE alone (3-channel base, 16 latent channels), seeded on its own: validation decoding
    builds it without building the transformer or the text encoder, and gets the pipeline's weights."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )


def tiny_hunyuan_vae(seed: int = 0):
    """The tiny HunyuanVideo VAE alone (4 latent channels), seeded on its own (see tiny_wan_vae)."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        # the released VAE's constructor defaults (3D blocks, strides 8 and 4, scaling factor) but tiny widths
        return AutoencoderKLHunyuanVideo(
            latent_channels=4, block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4
        )


def tiny_t5(vocab_size: int):
    """A 2-layer T5 encoder (diffusers' Wan test sizes): the tiny Wan's text encoder, HunyuanVideo-1.5's glyph one.
    Its weights come from the caller's RNG state."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def tiny_wan_pipeline(seed: int = 0):
    """WanPipeline with a 2-layer transformer, a 3-channel-base VAE and a 2-layer T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_tokenizer()
        te = tiny_t5(len(tok))
        net = WanTransformer3DModel(**TINY_WAN_TRANSFORMER)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=te.eval(),
        vae=tiny_wan_vae(seed),
        transformer=net,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def tiny_wan22_pipeline(seed: int = 0, boundary: float = 0.875):
    """The tiny Wan as a two-expert Wan 2.2 A14B: transformer (high-noise) as tiny_wan_pipeline's, transformer_2
    (low-noise) the same config with other weights, and WanPipeline's boundary_ratio."""
    from diffusers import WanPipeline, WanTransformer3DModel

    one = tiny_wan_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)  # seed + 1 is the VAE's
        low = WanTransformer3DModel(**TINY_WAN_TRANSFORMER)
    parts = {k: v for k, v in one.components.items() if k != "transformer_2"}
    return WanPipeline(**parts, transformer_2=low, boundary_ratio=boundary)


# the tiny Wan 2.2 VAE's latent statistics: 48 distinct values each (not diffusers' test zeros and ones), so a
# normalisation that skipped or mixed up channels would show in the exactness tests
TINY_WAN22_LATENTS_MEAN = [round(0.05 * ((7 * i) % 13 - 6), 4) for i in range(48)]
TINY_WAN22_LATENTS_STD = [round(0.4 + 0.05 * ((5 * i) % 17), 4) for i in range(48)]


def tiny_wan22_vae(seed: int = 0):
    """The tiny Wan 2.2 VAE alone (z_dim 48, 2x2 pixel patchify + 8x downsampling = 16x spatial), as diffusers'
    test_wan_22.py builds its TI2V-5B case; seeded on its own (see tiny_wan_vae)."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return AutoencoderKLWan(
            base_dim=3,
            z_dim=48,
            in_channels=12,  # 3 RGB channels x the 2x2 patch
            out_channels=12,
            is_residual=True,
            patch_size=2,
            latents_mean=TINY_WAN22_LATENTS_MEAN,
            latents_std=TINY_WAN22_LATENTS_STD,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            temperal_downsample=[False, True, True],
        )


def tiny_wan22_ti2v_pipeline(seed: int = 0):
    """WanPipeline(expand_timesteps=True) shaped like Wan 2.2 TI2V-5B: the tiny Wan's tokenizer and T5, a
    48-channel transformer, the z_dim=48 VAE and UniPC with flow_shift 5.0 (the 5B repository's scheduler)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    t2v = tiny_wan_pipeline(seed)  # its tokenizer and text encoder (same weights as base `tiny`)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        net = WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, "in_channels": 48, "out_channels": 48})
    return WanPipeline(
        tokenizer=t2v.tokenizer,
        text_encoder=t2v.text_encoder,
        vae=tiny_wan22_vae(seed),
        transformer=net,
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
        ),
        expand_timesteps=True,
    )


# tiny builds other than a family's default, by BaseSpec.tiny: (pipeline, VAE alone)
TINY_BUILDS = {
    "wan22_a14b": (tiny_wan22_pipeline, tiny_wan_vae),
    "wan22_ti2v": (tiny_wan22_ti2v_pipeline, tiny_wan22_vae),
}


# what HunyuanVideo's tiny Llama and CLIP text encoders share (diffusers' own HunyuanVideo pipeline test sizes)
TINY_TEXT_ENCODER = dict(
    bos_token_id=0,
    eos_token_id=2,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    pad_token_id=1,
    hidden_act="gelu",
)


def tiny_hunyuan_pipeline(seed: int = 0):
    """HunyuanVideoPipeline with one double and one single block, tiny Llama and CLIP encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llama_tok = tiny_tokenizer(specials=("<unk>", "<pad>", "</s>", "<s>"), eos="</s>", bos="<s>")
        clip_tok = tiny_tokenizer(
            specials=("<|startoftext|>", "<pad>", "<|endoftext|>", "<unk>"), eos="<|endoftext|>", bos="<|startoftext|>"
        )
        llama = LlamaModel(LlamaConfig(**TINY_TEXT_ENCODER, hidden_size=16, vocab_size=len(llama_tok)))
        clip = CLIPTextModel(
            CLIPTextConfig(**TINY_TEXT_ENCODER, hidden_size=8, vocab_size=len(clip_tok), projection_dim=32)
        )
        net = HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        )
    return HunyuanVideoPipeline(
        text_encoder=llama.eval(),
        tokenizer=llama_tok,
        transformer=net,
        vae=tiny_hunyuan_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip.eval(),
        tokenizer_2=clip_tok,
    )


# Qwen2.5-VL's chat layout (the system and user turns, then the assistant's turn opened), which
# HunyuanVideo15Pipeline renders with tokenizer.apply_chat_template before it crops the system turn
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# the tiny HunyuanVideo-1.5 transformer (diffusers' tests/pipelines/hunyuan_video1_5 sizes, two blocks):
# in_channels = 2 * 4 + 1 (latent, conditioning latent, its mask), text widths of the tiny Qwen and T5
TINY_HUNYUAN15_TRANSFORMER = dict(
    in_channels=9,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=1,
    patch_size_t=1,
    text_embed_dim=16,
    text_embed_2_dim=32,
    image_embed_dim=12,
    rope_axes_dim=(2, 2, 4),
    target_size=16,
    task_type="t2v",
)


def tiny_hunyuan15_vae(seed: int = 0):
    """The tiny HunyuanVideo-1.5 VAE alone (4 latent channels, strides 2 and 4), seeded on its own."""
    from diffusers import AutoencoderKLHunyuanVideo15

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return AutoencoderKLHunyuanVideo15(
            latent_channels=4,
            block_out_channels=(16, 16),
            layers_per_block=1,
            spatial_compression_ratio=4,
            temporal_compression_ratio=2,
            downsample_match_channel=False,
            upsample_match_channel=False,
        )


def _hunyuan15_system_message() -> str:
    """The system turn HunyuanVideo15Pipeline puts before every prompt (its Qwen encoder's default)."""
    import inspect

    from diffusers import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


def tiny_hunyuan15_pipeline(seed: int = 0, guidance: float = 6.0):
    """HunyuanVideo15Pipeline: a 2-block transformer, a tiny Qwen2.5-VL text model with a chat template, a tiny
    T5 encoder with ByT5's byte tokenizer (no files), CFG by a ClassifierFreeGuidance guider."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # the system message in the BPE corpus: it tokenizes short, so the pipeline's fixed crop of 108 tokens
        # leaves the prompt (and the tail of the system turn) inside the max length
        qwen_tok = tiny_tokenizer(
            specials=("<pad>", "<|im_end|>", "<unk>", "<|im_start|>"),
            eos="<|im_end|>",
            corpus=CORPUS + [_hunyuan15_system_message()] * 4,
            vocab_size=600,
        )
        qwen_tok.chat_template = QWEN_CHAT_TEMPLATE
        qwen = Qwen2_5_VLTextModel(
            Qwen2_5_VLTextConfig(
                vocab_size=len(qwen_tok),
                hidden_size=16,
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                rope_theta=1000000.0,
                bos_token_id=None,
                eos_token_id=qwen_tok.eos_token_id,
                pad_token_id=qwen_tok.pad_token_id,
            )
        )
        byt5_tok = ByT5Tokenizer()
        t5 = tiny_t5(len(byt5_tok))
        net = HunyuanVideo15Transformer3DModel(**TINY_HUNYUAN15_TRANSFORMER)
    return HunyuanVideo15Pipeline(
        text_encoder=qwen.eval(),
        tokenizer=qwen_tok,
        transformer=net,
        vae=tiny_hunyuan15_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=t5.eval(),
        tokenizer_2=byt5_tok,
        guider=ClassifierFreeGuidance(guidance_scale=guidance),
    )
