"""Wan 2.1 (T2V 1.3B / 14B), Wan 2.2 T2V-A14B (two experts) and TI2V-5B (per-token timesteps) through diffusers'
WanPipeline."""

from __future__ import annotations

import torch

from surf_train.base.adapter import BaseModel, BaseSpec, Cond, expert_at, negatives
from surf_train.base.sampling import PreviewPlan, Step, low_res_sigmas, noise_gain, scheduler_on
from surf_train.common.errors import ConfigError


class WanBase(BaseModel):
    """Wan: umT5 text, classifier-free guidance with a negative prompt, per-channel latent mean/std."""

    pipeline_name, tiny_name = "WanPipeline", "tiny_wan_pipeline"
    takes_embeds = True

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
    def encode_prompt(
        self,
        prompts: list[str] | None,
        negative_prompt: str | list[str] | None = None,
        max_sequence_length: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> Cond:
        """negative_prompt None: the base model's (conf/base); a list: one per prompt. prompt_embeds (B, L, D): given
        instead of prompts, as WanPipeline takes them; the negative branch is encoded unless given, and left out
        (no CFG) by a pipeline without a text encoder."""
        n = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        negs = negatives(self.spec.negative_prompt if negative_prompt is None else negative_prompt, n)
        pos, neg = self.pipe.encode_prompt(
            prompts,
            negative_prompt=negs,
            do_classifier_free_guidance=negative_prompt_embeds is not None or self.pipe.text_encoder is not None,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length or self.spec.max_sequence_length,
            device=self.device,
            dtype=self.dtype,
        )
        cast = lambda t: None if t is None else t.to(self.device, self.dtype)  # noqa: E731 (given ones as encoded)
        return Cond(embeds=cast(pos), negative=cast(neg))  # (B, L, D) each, zero-padded to L

    @property
    def expand_timesteps(self) -> bool:
        """Whether the pipeline passes a timestep per token (Wan 2.2 TI2V-5B's model_index.json sets it)."""
        return bool(self.pipe.config.get("expand_timesteps", False))

    @property
    def flops_config(self) -> dict:
        return {**self.pipe.transformer.config, "expand_timesteps": self.expand_timesteps}  # a time embedding per token

    def _timestep(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """The timestep WanPipeline passes the transformer for x (B, C, F, H, W): (B,), or (B, F * H/2 * W/2)."""
        t = step.timestep.to(x.device)
        if not self.expand_timesteps:
            return t.expand(x.shape[0])
        # as WanPipeline with expand_timesteps: a float32 all-ones mask of the latent (text-to-video: no first frame
        # held clean) taken at stride 2 on H and W, the pipeline's own hard-coded stride (TI2V-5B's patch), times t
        mask = torch.ones(x.shape[2:], dtype=torch.float32, device=x.device)  # (F, H, W)
        return (mask[:, ::2, ::2] * t).flatten().unsqueeze(0).expand(x.shape[0], -1)  # (B, seq_len)

    def _forward(self, x: torch.Tensor, step: Step, cond: Cond, guidance: float) -> torch.Tensor:
        # as WanPipeline: the scheduler's timestep expanded to the batch (or per token), the conditional and the
        # negative branch as two calls (each in its own cache context), combined in the transformer's dtype
        t = self._timestep(x, step)
        out = self._call("cond", step, hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds)
        if guidance <= 1.0 or cond.negative is None:  # the pipeline's do_classifier_free_guidance
            return out
        neg = self._call("uncond", step, hidden_states=x, timestep=t, encoder_hidden_states=cond.negative)
        return neg + guidance * (out - neg)


def branch_experts(plan: PreviewPlan, prefix_hw: tuple[int, int], boundary: float | None) -> dict[str, list[str]]:
    """The expert of each base-model call of a noise-reshifting run, read off its schedules (docs/method.md).

    prefix: steps 0..k-1 at the prefix size; target: steps k..N-1 there (the pair's branch A, and the switch
    call `paper`/`snr` make); preview: the low-resolution steps, whose timesteps are the reshifted levels' (with
    `pool`/`snr` below the native ones, so the low-noise expert may take over earlier).
    """
    sched = plan.schedule.start()
    bt = None if boundary is None else boundary * sched.config.num_train_timesteps
    k, names = plan.switch, lambda ts: [expert_at(t, bt) for t in ts]
    levels = low_res_sigmas(plan.sigmas, k, plan.rule, noise_gain(tuple(prefix_hw), plan.preview_size, plan.down))
    low = scheduler_on(plan.schedule.scheduler, levels).timesteps if len(levels) > 1 else []
    return {"prefix": names(sched.timesteps[:k]), "target": names(sched.timesteps[k:]), "preview": names(low)}
