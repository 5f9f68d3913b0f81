"""Wan 2.1 (T2V 1.3B / 14B) through diffusers' WanPipeline."""

from __future__ import annotations

import torch

from surf_train.base.adapter import BaseModel, BaseSpec, Cond
from surf_train.base.sampling import Step
from surf_train.common.errors import ConfigError


class WanBase(BaseModel):
    """Wan: umT5 text, classifier-free guidance with a negative prompt, per-channel latent mean/std."""

    @staticmethod
    def pipeline_class() -> type:
        from diffusers import WanPipeline

        return WanPipeline

    @staticmethod
    def tiny_pipeline():
        from surf_train.base.tiny import tiny_wan_pipeline

        return tiny_wan_pipeline()

    @classmethod
    def load(cls, spec: BaseSpec, device: torch.device) -> WanBase:
        import surf_train.base.known_warnings  # noqa: F401  (the toy's stand-in VAE and text encoder)

        return super().load(spec, device)

    def _patch(self) -> tuple[int, int]:
        pt, ph, pw = self.pipe.transformer.config.patch_size
        if ph != pw:
            raise ConfigError(f"{self.spec.model_id}: non-square patch {ph}x{pw} is not supported")
        return pt, ph

    def check_grid(self, latent_hw: tuple[int, int], frames: int) -> None:
        # Wan's RoPE tables hold rope_max_seq_len positions per axis; larger grids would silently alias
        limit = self.pipe.transformer.config.rope_max_seq_len
        grid = (frames, latent_hw[0] // self.spec.patch_s, latent_hw[1] // self.spec.patch_s)
        if max(grid) > limit:
            raise ConfigError(f"{self.spec.model_id}: token grid {grid} exceeds rope_max_seq_len={limit}")

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative_prompt: str | None = None) -> Cond:
        """negative_prompt None: the base model's (conf/base)."""
        neg = self.spec.negative_prompt if negative_prompt is None else negative_prompt
        pos, neg = self.pipe.encode_prompt(
            prompts,
            negative_prompt=[neg] * len(prompts),
            do_classifier_free_guidance=True,
            max_sequence_length=self.spec.max_sequence_length,
            device=self.device,
            dtype=self.dtype,
        )
        return Cond(embeds=pos, negative=neg)  # (B, L, D) each, zero-padded to L

    def _forward(self, x: torch.Tensor, step: Step, cond: Cond, guidance: float) -> torch.Tensor:
        # as WanPipeline: the scheduler's timestep expanded to the batch, the conditional and the negative branch
        # as two calls (each in its own cache context), combined in the transformer's dtype
        t = step.timestep.to(x.device).expand(x.shape[0])
        out = self._call("cond", step, hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds)
        if guidance <= 1.0 or cond.negative is None:  # the pipeline's do_classifier_free_guidance
            return out
        neg = self._call("uncond", step, hidden_states=x, timestep=t, encoder_hidden_states=cond.negative)
        return neg + guidance * (out - neg)
