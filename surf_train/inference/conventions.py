"""diffusers' conventions a SurfPipeline call follows beyond the maths: step-end callbacks (as WanPipeline runs them)
and loaded weights that compute as built ones (`realign`)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from surf_train.common.errors import ConfigError


def callback_inputs(callback, names: list[str], allowed: list[str]) -> list[str]:
    """The tensors a step-end callback gets (a PipelineCallback names its own); ConfigError for unknown ones."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        names = callback.tensor_inputs
    bad = sorted(set(names) - set(allowed))
    if bad:
        raise ConfigError(f"callback_on_step_end_tensor_inputs {bad}: not in {allowed}")
    return list(names)


def step_end(pipe, callback, names: list[str], cond):
    """after(t, x) -> x for the samplers (sampling.AfterStep): callback(pipe, i, t, {name: tensor}) after step i of
    the call, as diffusers pipelines call callback_on_step_end; what it returns replaces the latents and the
    prompt embeddings (`cond`'s, which the velocity reads). None without a callback."""
    if callback is None:
        return None
    counter = itertools.count()

    def after(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pipe._current_timestep = t
        local = {"latents": x, "prompt_embeds": cond.embeds, "negative_prompt_embeds": cond.negative}
        out = callback(pipe, next(counter), t, {k: local[k] for k in names})
        cond.embeds = out.pop("prompt_embeds", cond.embeds)
        cond.negative = out.pop("negative_prompt_embeds", cond.negative)
        return out.pop("latents", x)

    return after


ALIGN = 64  # bytes: PyTorch's CPU allocator's alignment


@torch.no_grad()
def realign(module: torch.nn.Module) -> None:
    """Copy parameters and buffers that do not start on an ALIGN-byte boundary into fresh memory.

    Tensors loaded from safetensors can sit at any 8-byte offset of the file's mapping, and CPU matmul kernels
    round differently on misaligned inputs (about 1e-6 on the tiny Wan), so a loaded pipeline would not reproduce
    the saved one bit for bit. Fresh copies sit where the allocator puts every tensor."""
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "cpu" and t.numel() and t.data_ptr() % ALIGN:
            t.data = t.data.clone()


MODULE_FILE = "surf_pipeline.py"  # saved with a SurfPipeline: diffusers' trust_remote_code route finds the class here
MODULE_SOURCE = '''"""SurfPipeline for diffusers: DiffusionPipeline.from_pretrained(<this dir>, trust_remote_code=True).

The class lives in the surf_train package (docs/generation.md); this file only points diffusers at it."""

from surf_train.inference.pipeline import SurfPipeline

__all__ = ["SurfPipeline"]
'''


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_module_file(directory) -> None:
    """MODULE_FILE in a saved pipeline's directory and `_class_name` [module, class] in its model_index.json."""
    d = Path(directory)
    _write_atomic(d / MODULE_FILE, MODULE_SOURCE)
    index = json.loads((d / "model_index.json").read_text())
    index["_class_name"] = [Path(MODULE_FILE).stem, index["_class_name"]]
    _write_atomic(d / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
