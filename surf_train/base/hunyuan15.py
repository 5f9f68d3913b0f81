"""HunyuanVideo-1.5 (text to video) through diffusers' HunyuanVideo15Pipeline: CFG by its guider."""

from __future__ import annotations

import math

import torch

from surf_train.base.adapter import BaseModel, BaseSpec, Cond, negatives
from surf_train.base.sampling import Step
from surf_train.common.errors import ConfigError


class Hunyuan15Base(BaseModel):
    """HunyuanVideo-1.5: Qwen2.5-VL and glyph ByT5 text with masks, a ClassifierFreeGuidance guider, a scaled
    latent; the transformer reads the latent with a zero conditioning latent and mask beside it (text to video)."""

    custom_sigmas = True  # HunyuanVideo15Pipeline passes sigmas=linspace(1, 0, N + 1)[:-1] to set_timesteps

    def __init__(self, spec: BaseSpec, pipe, device: torch.device):
        # the pipeline pads the Qwen prompt to this many tokens after cropping its system turn (encode_prompt
        # reads the attribute), so the conf/base value is the one every path uses
        pipe.tokenizer_max_length = spec.max_sequence_length
        super().__init__(spec, pipe, device)

    pipeline_name, tiny_name = "HunyuanVideo15Pipeline", "tiny_hunyuan15_pipeline"

    def _patch(self) -> tuple[int, int]:
        c = self.pipe.transformer.config
        return c.patch_size_t, c.patch_size

    def _check_loaded(self) -> None:
        # the transformer takes 2 * C + 1 input channels (latent, conditioning latent, its mask) and gives C
        cfg = self.pipe.transformer.config
        p = self.pipe
        got = (cfg.out_channels, p.vae_scale_factor_temporal, p.vae_scale_factor_spatial, *self._patch())
        want = (self.spec.channels, self.spec.stride_t, self.spec.stride_s, self.spec.patch_t, self.spec.patch_s)
        if got != want or cfg.in_channels != 2 * cfg.out_channels + 1:
            raise ConfigError(
                f"base model {self.spec.model_id}: loaded (channels, stride_t, stride_s, patch_t, patch_s)={got} "
                f"(in_channels {cfg.in_channels}) but conf/base/{self.spec.name}.yaml says {want}"
            )

    @torch.no_grad()
    def encode_prompt(
        self, prompts: list[str], negative_prompt: str | list[str] | None = None, max_sequence_length: int | None = None
    ) -> Cond:
        """Both encoders for the prompts and the negative prompts (None: the base model's; "" as the pipeline's
        default; a list: one per prompt). Masks are 1 on real tokens; the glyph encoder's rows are zero with a zero
        mask when a prompt quotes no text. max_sequence_length: the Qwen tokens kept (None: the base model's)."""
        negs = negatives(self.spec.negative_prompt if negative_prompt is None else negative_prompt, len(prompts))
        kw = dict(device=self.device, dtype=self.dtype, batch_size=len(prompts))
        self.pipe.tokenizer_max_length = max_sequence_length or self.spec.max_sequence_length
        try:  # each (B, L, D), (B, L), (B, 256, D2), (B, 256) in the transformer's dtype, as the pipeline casts them
            embeds, mask, embeds_2, mask_2 = self.pipe.encode_prompt(prompts, **kw)
            n_embeds, n_mask, n_embeds_2, n_mask_2 = self.pipe.encode_prompt(negs, **kw)
        finally:
            self.pipe.tokenizer_max_length = self.spec.max_sequence_length
        extra = {"mask": mask, "embeds_2": embeds_2, "mask_2": mask_2}
        extra |= {"neg_mask": n_mask, "neg_embeds_2": n_embeds_2, "neg_mask_2": n_mask_2}
        return Cond(embeds=embeds, negative=n_embeds, extra=extra)

    def _branch(self, name: str, x: torch.Tensor, step: Step, cond: Cond, negative: bool) -> torch.Tensor:
        # as HunyuanVideo15Pipeline (text to video): [x, zero conditioning latent (B, C, F, H, W), zero mask
        # (B, 1, F, H, W)] on channels, the timestep in the latent's dtype, zero image embeddings (B, 729, D_img)
        b, _, f, h, w = x.shape
        inp = torch.cat([x, torch.zeros_like(x), x.new_zeros(b, 1, f, h, w)], dim=1)
        t = step.timestep.to(x.device).expand(b).to(x.dtype)
        image = x.new_zeros(b, self.pipe.vision_num_semantic_tokens, self.pipe.transformer.config.image_embed_dim)
        e = cond.extra
        pre = "neg_" if negative else ""
        return self._call(
            name,
            step,
            hidden_states=inp,
            image_embeds=image,
            timestep=t,
            encoder_hidden_states=cond.negative if negative else cond.embeds,
            encoder_attention_mask=e[pre + "mask"],
            encoder_hidden_states_2=e[pre + "embeds_2"],
            encoder_attention_mask_2=e[pre + "mask_2"],
        )

    def _forward(self, x: torch.Tensor, step: Step, cond: Cond, guidance: float) -> torch.Tensor:
        # the guider's branches in its order (conditional first, each in its cache context) and its combination
        g = self.pipe.guider.config
        skip = (int(g.start * step.steps), int(g.stop * step.steps))
        close = math.isclose(guidance, 0.0 if g.use_original_formulation else 1.0)
        cfg = g.enabled and skip[0] <= step.index < skip[1] and not close and cond.negative is not None
        out = self._branch("pred_cond", x, step, cond, False)
        if cfg:
            neg = self._branch("pred_uncond", x, step, cond, True)
            shift = out - neg
            pred = (out if g.use_original_formulation else neg) + guidance * shift
        else:
            pred = out
        if g.guidance_rescale > 0.0:
            from diffusers.guiders.guider_utils import rescale_noise_cfg

            pred = rescale_noise_cfg(pred, out, g.guidance_rescale)
        return pred
