"""HunyuanVideo through diffusers' HunyuanVideoPipeline (embedded guidance, no CFG batch)."""

from __future__ import annotations

import torch

from surf_train.base.adapter import BaseModel, Cond
from surf_train.base.sampling import Step


class HunyuanBase(BaseModel):
    """HunyuanVideo: Llama + CLIP text, guidance as a transformer input, scaled latents."""

    custom_sigmas = True  # HunyuanVideoPipeline passes sigmas=linspace(1, 0, N + 1)[:-1] to set_timesteps
    cfg_branch = False  # guidance is a transformer input: nothing to truncate

    pipeline_name, tiny_name = "HunyuanVideoPipeline", "tiny_hunyuan_pipeline"

    def _patch(self) -> tuple[int, int]:
        c = self.pipe.transformer.config
        return c.patch_size_t, c.patch_size

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int | None = None) -> Cond:
        kw = {} if self.spec.prompt_template is None else {"prompt_template": dict(self.spec.prompt_template)}
        embeds, pooled, mask = self.pipe.encode_prompt(
            prompts,
            prompt_2=prompts,
            device=self.device,
            dtype=self.dtype,
            max_sequence_length=max_sequence_length or self.spec.max_sequence_length,
            **kw,
        )
        # the pipeline casts all three to the transformer's dtype before its loop
        return Cond(embeds=embeds.to(self.dtype), extra={"pooled": pooled.to(self.dtype), "mask": mask.to(self.dtype)})

    def _forward(self, x: torch.Tensor, step: Step, cond: Cond, guidance: float) -> torch.Tensor:
        # as HunyuanVideoPipeline: timestep in float32, embedded guidance * 1000 in the transformer's dtype
        b = x.shape[0]
        t = step.timestep.to(x.device).expand(b).to(torch.float32)
        g = torch.tensor([guidance] * b, dtype=self.dtype, device=x.device) * 1000.0
        return self._call(
            "cond",
            step,
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.extra["mask"],
            pooled_projections=cond.extra["pooled"],
            guidance=g,
        )
