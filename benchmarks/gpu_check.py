"""One GPU check of the paper's set-up, in one process and under 8 minutes on one H100/H200 (issue 18).

    python3 benchmarks/gpu_check.py [--out-dir benchmarks/results/gpu] [--budget-s 420] [--parts a,b] [--no-compile]
    python3 benchmarks/gpu_check.py --dry-run        # every part on CPU at tiny shapes (tests/test_gpu_check.py)

Writes <out-dir>/<gpu name>.json and .md (after every measurement, so a timeout still leaves results) and
prints a summary table. Parts, most valuable first; each is skipped with a reason when a dependency is
missing, and a failure (an OOM included) is recorded and the next part runs:
  environment         torch / CUDA / GPU, which packages and project modules import, and per attention call
                      of the Refiner (grouped and mask window forms, plain and shifted blocks, cross-attention)
                      and of Wan, on its real q/k/v shapes: the SDPA backend PyTorch picks and the time of each
                      backend forced with torch.nn.attention.sdpa_kernel.
  refiner_train       the `paper` Refiner (1.05B): one training step (bridge loss, backward, AdamW; fp32 weights,
                      bf16 autocast = Lightning's bf16-mixed; activation checkpointing) at the Wan 720p latent,
                      grouped and mask window forms.
  refiner_sample      K = 10 Refiner sampling steps, bf16 weights (its fp32 modules kept), at 720p and at 1088x1920;
                      then, unless --no-compile, the 720p case again after regional compilation
                      (compile_repeated_blocks(fullgraph=True)): compile seconds, time and output against eager.
  wan14b              Wan 2.1 14B-shaped WanTransformer3DModel (its released config, built on the meta device and
                      materialised on the GPU with random bf16 weights: no download), one forward at batch 2 (CFG)
                      on the 720p, 480p and 240p latents; the baseline (50 steps at 720p) and SURF (10 at 480p +
                      30 at 240p + 10 Refiner steps) composed into seconds, next to the paper's 3497 s -> 278 s and
                      surf_train.flops' prediction (step counts and sizes come from flops.RunSettings); then the
                      720p forward compiled as refiner_sample's (the composition stays eager).
  ti2v5b              Wan 2.2 TI2V-5B-shaped transformer (its released config, random bf16 weights as wan14b), one
                      forward at batch 2 (CFG) with per-token timesteps (expand_timesteps) on the 704x1280 target
                      (= its native prefix) and 352x640 preview latents of 121 frames (48 channels, 16x VAE).
                      The A14B expert has the 14B's shape and cost: wan14b measures it.
  lightning_deepspeed `python -m surf_train +experiment=wan` shrunk to a mid-sized Refiner: 5 steps of Lightning's
                      DeepSpeed ZeRO-2 in bf16-mixed on one GPU on shards written here by surf_train.data.shards, the
                      ZeRO checkpoint, `python -m surf_train.export` of it and a load of the export.
Times: CUDA events after a warm-up (perf_counter on CPU), the median of the repeats the part's deadline
allows. A compiled case runs only when Plan.compile_estimate_s + 2 eager calls fit the part's deadline (the
eager repeats stop Plan.compile_reserve_s early to leave it room). Peak memory: torch.cuda.max_memory_allocated
per case. TFLOP/s: surf_train.flops' analytic count (forward x 3 for a training step: the recomputation of
checkpointing is not counted) over the median time.

Getting it onto the GPU machine (no package registry there; torch, lightning, transformers, safetensors,
einops, torchmetrics, accelerate, huggingface-hub, numpy, setuptools and ninja are installed). Here, with PyPI
reachable, `make gpu-wheels` downloads into .whl/ (ignored by git; 12 MB) the packages it lacks, at the
versions of constraints-cpu.txt, for CPython 3.12 on manylinux x86_64: wheels of diffusers, hydra-core,
omegaconf, antlr4-python3-runtime (PyPI has only its sdist: pure Python, built into a wheel here), webdataset,
braceexpand, importlib_metadata, lazy-importer, pydantic, pydantic-core, annotated-types, typing-inspection,
typing_extensions and hjson, and deepspeed's sdist. On the GPU machine (the device tool's run, with
carry [".whl"]), from the repository root, `make gpu-check GPU_CHECK_ARGS="--out-dir $OUT"`, or without make:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit; DS_BUILD_OPS=0 PYTHONPATH=/tmp/site python3 -m pip install -q --no-index --no-deps \
      --no-build-isolation --no-compile --no-cache-dir --upgrade --target /tmp/site_ds .whl/deepspeed-*.tar.gz \
      || exit; PYTHONPATH=/tmp/site:/tmp/site_ds:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out-dir $OUT

deepspeed's setup.py imports torch, so --no-build-isolation builds it against the machine's own CUDA torch
(about 10 s); DS_BUILD_OPS=0 compiles no op ahead of time (ZeRO-2 with torch's AdamW needs none). Then copy
<gpu name>.json and .md from $OUT into benchmarks/results/gpu/ (the .lightning.log beside them is the
training subprocess's output).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import importlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project is importable without an install
    sys.path.insert(0, str(ROOT))

SCHEMA_VERSION = 1
PARTS = ("environment", "refiner_train", "refiner_sample", "wan14b", "ti2v5b", "lightning_deepspeed")
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
PACKAGES = (
    "torch",
    "lightning",
    "deepspeed",
    "diffusers",
    "transformers",
    "hydra",
    "omegaconf",
    "webdataset",
    "braceexpand",
    "safetensors",
    "einops",
    "torchmetrics",
    "pydantic",
    "accelerate",
    "wandb",
    "av",
    "decord",
)
MODULES = (
    "surf_train.models.windows",
    "surf_train.models.refiner",
    "surf_train.flops",
    "surf_train.training.objective",
    "surf_train.data.shards",
    "surf_train.data.datamodule",
    "surf_train.training.module",
    "surf_train.training.strategies",
    "surf_train.training.train",
    "surf_train.export",
    "surf_train.base",
    "surf_train.generate",
)
GIB = 2**30
CPU_MEM = "CPU run: torch.cuda.max_memory_allocated is CUDA-only"


# --- what runs: the real set-up and its tiny CPU sibling ------------------------------------------


@dataclass
class Plan:
    """Sizes (width, height) in pixels, models and step budgets of one run."""

    dry_run: bool
    frames: int = 81
    target: tuple[int, int] = (1280, 720)
    large: tuple[int, int] = (1920, 1088)  # 1080p rounded up to the VAE x patch multiple of 16
    refiner: dict = field(default_factory=lambda: {"grad_checkpointing": True})  # paper preset overrides
    wan: dict = field(default_factory=dict)  # overrides of flops.ARCH["wan2.1_t2v_14b"]
    ti2v: dict = field(default_factory=dict)  # overrides of flops.ARCH["wan2.2_ti2v_5b"]
    ti2v_frames: int = 121  # TI2V-5B's native clip (24 fps)
    ti2v_sizes: dict = field(default_factory=lambda: {"target": (1280, 704), "preview": (640, 352)})
    text_len: int = 512  # Wan pads prompts to 512 umT5 tokens
    sample_steps: int = 10
    repeats: int = 3
    math_max_gib: float = 16.0  # the MATH backend materialises the scores: skip it above this
    # regional compilation (compile_repeated_blocks) of the target case of the parts in compile_estimate_s: the
    # estimated seconds of compilation decide whether the compiled case still fits the part's deadline; the eager
    # repeats stop compile_reserve_s before it (their warm-up and first timed call always run). GPU values: guesses
    # (cold cache, one block class each) until a run records compile_s; the reserves add two eager target calls
    # (~4 s of 10 Refiner steps, ~25 s of a Wan 14B 720p forward at batch 2, from their TFLOP at ~500 TFLOP/s)
    compile: bool = True
    compile_kwargs: dict = field(default_factory=lambda: {"fullgraph": True})
    compile_estimate_s: dict = field(default_factory=lambda: {"refiner_sample": 30, "wan14b": 40})
    compile_reserve_s: dict = field(default_factory=lambda: {"refiner_sample": 40, "wan14b": 95})
    # Lightning part: model overrides of the `wan` experiment, shard latents (C, F, H, W) and text tokens
    ds_model: dict = field(default_factory=lambda: {"dim": 1024, "depth": 8, "heads": 8, "mlp_ratio": 4.0})
    ds_target: tuple[int, int, int, int] = (16, 9, 64, 64)
    ds_text: tuple[int, int] = (32, 4096)
    ds_extra: list = field(default_factory=lambda: ["data.num_workers=2"])
    # per-part caps in seconds, and the least time a part needs to start at all
    caps: dict = field(
        default_factory=lambda: {
            "environment": 45,
            "refiner_train": 80,
            "refiner_sample": 100,
            "wan14b": 220,
            "ti2v5b": 40,
            "lightning_deepspeed": 140,
        }
    )
    floors: dict = field(
        default_factory=lambda: {
            "environment": 10,
            "refiner_train": 20,
            "refiner_sample": 15,
            "wan14b": 60,
            "ti2v5b": 15,
            "lightning_deepspeed": 60,
        }
    )

    @classmethod
    def dry(cls) -> Plan:
        """Every part at tiny shapes on CPU (seconds): same code paths, same JSON schema."""
        small = {
            "dim": 32,
            "depth": 2,
            "heads": 2,
            "mlp_ratio": 2.0,
            "text_dim": 32,
            "window": (2, 4, 4),
            "grad_checkpointing": True,
        }
        return cls(
            dry_run=True,
            frames=5,
            target=(128, 64),
            large=(192, 96),
            refiner=small,
            wan={"num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 2, "text_dim": 32},
            ti2v={"num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 2, "text_dim": 32},
            ti2v_frames=5,
            ti2v_sizes={"target": (128, 64), "preview": (64, 32)},
            text_len=16,
            sample_steps=3,
            repeats=2,
            math_max_gib=1.0,
            compile_estimate_s={"refiner_sample": 15, "wan14b": 10},  # a cold inductor cache on 2 shared CPU cores
            compile_reserve_s={"refiner_sample": 16, "wan14b": 11},
            ds_model={"dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0, "text_dim": 32, "window": [2, 4, 4]},
            ds_target=(16, 3, 8, 8),
            ds_text=(8, 32),
            ds_extra=["data.num_workers=2", "trainer.accelerator=cpu"],
            caps={
                "environment": 30,
                "refiner_train": 20,
                "refiner_sample": 40,
                "wan14b": 40,
                "ti2v5b": 20,
                "lightning_deepspeed": 110,
            },
            floors={p: 1 for p in PARTS},
        )


def run_settings():
    """The paper's Wan 2.1 14B runs as surf_train.flops models them (50 steps vs 10 + 30 + 10)."""
    from surf_train.cost import RunSettings

    return RunSettings()


def sizes(plan: Plan) -> dict[str, tuple[int, int]]:
    """Pixel sizes of the stages: target, large (Refiner only), prefix (480p) and preview (240p)."""
    from surf_train.cost import PREFIX

    s = run_settings()
    if plan.dry_run:  # the same 3 : 2 : 1 ladder of heights, tiny
        return {"target": plan.target, "large": plan.large, "prefix": (96, 48), "preview": (64, 32)}
    return {"target": tuple(s.target), "large": plan.large, "prefix": PREFIX["wan"], "preview": tuple(s.preview)}


def latent(plan: Plan, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(C, F, H, W) Wan latent of a video of plan.frames frames at `size` (width, height)."""
    from surf_train.cost import BaseArch

    return BaseArch.from_name("wan2.1_t2v_14b").latent(plan.frames, size)


def forwards(plan: Plan, cases: dict[str, tuple]) -> dict:
    """The results of a part that times a base transformer's forwards at batch 2 (CFG): name -> (size, latent)."""
    return {
        "config": None,
        "params": None,
        "batch": 2,
        "text_len": plan.text_len,
        "dtype": "bfloat16",
        "cases": {
            k: measurement(size=fmt_size(s), latent=list(lat), output_finite=None) for k, (s, lat) in cases.items()
        },
    }


def ti2v_latent(plan: Plan, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(C, F, H, W) Wan 2.2 TI2V-5B latent (48 channels, 16x spatial) of plan.ti2v_frames frames at `size`."""
    from surf_train.cost import BaseArch

    return BaseArch.from_name("wan2.2_ti2v_5b").latent(plan.ti2v_frames, size)


def fmt_size(size) -> str:
    return f"{size[0]}x{size[1]}"


# --- the report: a JSON document that always has every field ---------------------------------------


def measurement(**fixed) -> dict:
    """One timed case; null fields are filled by measure() or explained in null_reasons."""
    return {
        "status": "pending",
        "reason": None,
        **fixed,
        "warmup": 0,
        "repeats": 0,
        "ms": None,
        "ms_min": None,
        "ms_samples": [],
        "timer": None,
        "peak_mem_gib": None,
        "tflop": None,
        "tflops_per_s": None,
        "null_reasons": {},
    }


def compile_call(plan: Plan) -> str:
    """How the compiled cases compile: diffusers' regional compilation with plan.compile_kwargs."""
    return f"compile_repeated_blocks({', '.join(f'{k}={v!r}' for k, v in plan.compile_kwargs.items())})"


def compiled_measurement(plan: Plan, size, lat, **fixed) -> dict:
    """The compiled twin of an eager case: measure()'s fields for the compiled calls, the first compiled call
    (compilation included) and the comparison with the eager case's time and output."""
    return measurement(
        size=fmt_size(size),
        latent=list(lat),
        **fixed,
        call=compile_call(plan),
        compile_s=None,
        eager_ms=None,
        speedup=None,
        max_abs_diff=None,
        out_abs_max=None,
        rel_diff=None,
    )


def all_cases(results: dict):
    """(name, record) of a part's eager cases, then of its compiled ones ("compiled <case>")."""
    yield from results.get("cases", {}).items()
    yield from ((f"compiled {k}", c) for k, c in results.get("compiled", {}).items())


SDPA_ITEM = (
    "model",
    "form",
    "block",
    "call",
    "calls_per_forward",
    "q",
    "k",
    "v",
    "mask",
    "dtype",
    "default_backend",
    "backends",
    "null_reasons",
)


def skeleton(plan: Plan) -> dict:
    """The document with every part and field present and nothing measured (status pending)."""
    sz = sizes(plan)

    def part(results: dict) -> dict:
        return {
            "status": "pending",
            "reason": None,
            "wall_s": None,
            "deadline_s": None,
            "warnings": [],
            "results": results,
            "null_reasons": {},
        }

    return {
        "schema_version": SCHEMA_VERSION,
        "script": "benchmarks/gpu_check.py",
        "command": None,
        "dry_run": plan.dry_run,
        "started_utc": None,
        "wall_s": None,
        "budget_s": None,
        "complete": False,
        "compile": {"enabled": plan.compile, "call": compile_call(plan)},
        "device": {"type": None, "name": None, "file_stem": None},
        "parts": {
            "environment": part(
                {
                    "python": None,
                    "platform": None,
                    "torch": None,
                    "cuda": None,
                    "cudnn": None,
                    "gpu": {
                        "name": None,
                        "capability": None,
                        "memory_gib": None,
                        "multiprocessors": None,
                        "driver": None,
                        "null_reasons": {},
                    },
                    "packages": {p: {"version": None, "error": None} for p in PACKAGES},
                    "project_modules": {m: {"ok": None, "error": None} for m in MODULES},
                    "sdpa": [],
                    "sdpa_summary": {},
                    "null_reasons": {},
                }
            ),
            "refiner_train": part(
                {
                    "config": None,
                    "params": None,
                    "latent": list(latent(plan, sz["target"])),
                    "preview_latent": list(latent(plan, sz["preview"])),
                    "text_len": plan.text_len,
                    "precision": "fp32 weights and AdamW state, bf16 autocast (Lightning bf16-mixed)",
                    "flop_model": "3 x analytic forward (surf_train.flops.refiner_flops); checkpoint recomputation "
                    "not counted",
                    "cases": {impl: measurement(impl=impl, loss=None) for impl in ("grouped", "mask")},
                    "mask_over_grouped": None,
                    "null_reasons": {},
                }
            ),
            "refiner_sample": part(
                {
                    "config": None,
                    "steps": plan.sample_steps,
                    "dtype": "bfloat16",
                    "cases": {
                        k: measurement(size=fmt_size(sz[k]), latent=list(latent(plan, sz[k])), per_step_ms=None)
                        for k in ("target", "large")
                    },
                    "compiled": {
                        "target": compiled_measurement(plan, sz["target"], latent(plan, sz["target"]), per_step_ms=None)
                    },
                    "null_reasons": {},
                }
            ),
            "wan14b": part(
                {
                    **forwards(plan, {k: (sz[k], latent(plan, sz[k])) for k in ("target", "prefix", "preview")}),
                    "compiled": {
                        "target": compiled_measurement(
                            plan, sz["target"], latent(plan, sz["target"]), output_finite=None
                        )
                    },
                    "composition": {
                        "baseline_s": None,
                        "surf_s": None,
                        "speedup": None,
                        "stages": [],
                        "refiner_step_source": None,
                        "null_reasons": {},
                    },
                    "flops_prediction": {"baseline_pflops": None, "surf_pflops": None, "speedup": None},
                    "paper": {"baseline_s": None, "surf_s": None, "speedup": None},
                    "measured_over_predicted": None,
                    "null_reasons": {},
                }
            ),
            "ti2v5b": part(forwards(plan, {k: (s, ti2v_latent(plan, s)) for k, s in plan.ti2v_sizes.items()})),
            "lightning_deepspeed": part(
                {
                    "command": None,
                    "params": None,
                    "shards": None,
                    "train": {
                        "returncode": None,
                        "wall_s": None,
                        "summary": None,
                        "log_tail": None,
                        "null_reasons": {},
                    },
                    "checkpoint": {"path_is_dir": None, "files": None, "mbytes": None},
                    "export": {"returncode": None, "wall_s": None, "output": None, "max_abs_diff": None},
                    "load": {
                        "wall_s": None,
                        "dtype": None,
                        "forward_finite": None,
                        "peak_mem_gib": None,
                        "null_reasons": {},
                    },
                    "null_reasons": {},
                }
            ),
        },
    }


def unexplained_nulls(doc: Any, path: str = "", excused: bool = False) -> list[str]:
    """Paths of null fields that nothing explains: a dict holding null_reasons must name every null field of
    its own in it, unless it (or a dict above it) has a status other than ok together with a reason."""
    out = []
    if isinstance(doc, dict):
        status = doc.get("status")
        if status not in (None, "ok") and not doc.get("reason"):
            out.append(f"{path}.reason")
        excused = excused or (status not in (None, "ok") and bool(doc.get("reason")))
        reasons = doc.get("null_reasons")
        for k, v in doc.items():
            if v is None and isinstance(reasons, dict) and k != "reason" and not excused and not reasons.get(k):
                out.append(f"{path}.{k}")
            out += unexplained_nulls(v, f"{path}.{k}", excused)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += unexplained_nulls(v, f"{path}[{i}]", excused)
    return out


class Report:
    """The document, written atomically as JSON + markdown after every change that matters."""

    def __init__(self, plan: Plan, out_dir: Path, stem: str, doc: dict):
        self.plan, self.out_dir, self.stem, self.doc = plan, out_dir, stem, doc
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"{self.stem}.json"

    def save(self) -> None:
        for path, text in (
            (self.json_path, json.dumps(self.doc, indent=1, default=str)),
            (self.out_dir / f"{self.stem}.md", markdown(self.doc)),
        ):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, path)


# --- timing ----------------------------------------------------------------------------------------


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_ms(fn: Callable[[], Any], dev: torch.device) -> float:
    """Milliseconds of one call: CUDA events on the GPU (queued work included), perf_counter on CPU."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(
    rec: dict,
    fn: Callable[[], Any],
    dev: torch.device,
    deadline: float,
    repeats: int,
    flop: float | None,
    warmup: int = 1,
) -> dict:
    """Warm up, then time fn() `repeats` times or fewer when the deadline nears (at least once); fills rec."""
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    last = 0.0
    for _ in range(warmup):
        last = timed_ms(fn, dev)
    samples: list[float] = []
    while len(samples) < repeats:
        if samples and time.monotonic() + last / 1e3 > deadline:  # at least one timed call, then the deadline
            break
        last = timed_ms(fn, dev)
        samples.append(last)
    ms = statistics.median(samples)
    rec.update(
        status="ok",
        warmup=warmup,
        repeats=len(samples),
        ms=ms,
        ms_min=min(samples),
        ms_samples=[round(s, 3) for s in samples],
        timer="cuda_event" if dev.type == "cuda" else "perf_counter",
    )
    if dev.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    else:
        rec["null_reasons"]["peak_mem_gib"] = CPU_MEM
    if flop is not None:
        rec["tflop"] = flop / 1e12
        rec["tflops_per_s"] = flop / (ms / 1e3) / 1e12
    else:
        rec["null_reasons"].update(tflop="no FLOPs model for this case", tflops_per_s="no FLOPs model for this case")
    return rec


def too_late(rec: dict, deadline: float, estimate_s: float | None, compile_s: float = 0.0) -> bool:
    """Mark rec skipped when its warm-up + one timed call (estimate_s each), after compile_s of compilation,
    would pass the deadline."""
    left = deadline - time.monotonic()
    need = None if estimate_s is None else 2 * estimate_s + compile_s
    if left <= 0 or (need is not None and need > left):
        comp = f" + ~{compile_s:.0f} s of compilation" if compile_s else ""
        est = "" if need is None else f" (estimated {need:.0f} s for warm-up + 1 call{comp})"
        rec.update(status="skipped", reason=f"part deadline: {max(left, 0):.0f} s left{est}")
        return True
    return False


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def short_error(e: BaseException) -> str:
    """One line: exception type and the first line of its message (OOMs included)."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:400] if msg else ''}"


@contextmanager
def case(rec: dict, report: Report):
    """Run one measurement; a failure (OOM included) is recorded in rec, memory freed, and the part goes on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure is data here
        rec.update(status="failed", reason=short_error(e))
        del e
    finally:
        free_memory()
        report.save()


# --- part 1: environment ---------------------------------------------------------------------------


def _called_from(name: str) -> bool:
    """Whether a function called `name` is on the stack (the windows reach SDPA through diffusers' dispatch)."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_name != name:
        f = f.f_back
    return f is not None


@contextmanager
def record_sdpa(calls: list[dict], label: dict):
    """Record the q/k/v/mask shapes of every F.scaled_dot_product_attention call (windows, refiner, diffusers)."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def rec(*args, **kwargs):
        names = ("query", "key", "value", "attn_mask")
        a = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
        call = (
            "self (windows)"
            if _called_from("_sdpa_windows")
            else "cross"
            if label.get("model") == "refiner"
            else "attention"
        )
        mask = a.get("attn_mask")
        calls.append(
            {
                **label,
                "call": call,
                "q": list(a["query"].shape),
                "k": list(a["key"].shape),
                "v": list(a["value"].shape),
                "mask": None if mask is None else list(mask.shape),
                "mask_dtype": None if mask is None else str(mask.dtype).replace("torch.", ""),
            }
        )
        return real(*args, **kwargs)

    F.scaled_dot_product_attention = rec
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def sdpa_signatures(plan: Plan) -> list[dict]:
    """Attention calls of one Refiner forward per window form (a plain and a shifted block; blocks repeat) and
    of one Wan block, traced on the meta device at the target latent: shapes only, nothing allocated."""
    from surf_train.models.refiner import Refiner, RefinerConfig

    lat = latent(plan, sizes(plan)["target"])
    calls: list[dict] = []
    for impl in ("grouped", "mask"):
        cfg = RefinerConfig.preset("paper", **{**plan.refiner, "depth": 2, "attn_impl": impl})
        with torch.device("meta"):
            net = Refiner.from_cfg(cfg)
            x, t = torch.empty(1, *lat), torch.empty(1)
            text, mask = torch.empty(1, plan.text_len, cfg.text_dim), torch.ones(1, plan.text_len, dtype=torch.bool)
        label = {"model": "refiner", "form": impl, "block": None}
        hooks = [
            blk.register_forward_pre_hook(lambda m, a, i=i: label.update(block="shifted" if i % 2 else "plain"))
            for i, blk in enumerate(net.blocks)
        ]
        with torch.no_grad(), record_sdpa(calls, label):
            net(x, t, x, text, mask)
        for h in hooks:
            h.remove()
    try:  # Wan's own attention through diffusers' dispatcher; one block is every block
        from diffusers import WanTransformer3DModel

        from surf_train.cost import ARCH

        with torch.device("meta"):
            wan = WanTransformer3DModel(**{**ARCH["wan2.1_t2v_14b"], **plan.wan, "num_layers": 1})
            x, t = torch.empty(2, *lat), torch.empty(2)
            text = torch.empty(2, plan.text_len, wan.config.text_dim)
        label = {"model": "wan", "form": None, "block": None}
        n0 = len(calls)
        with torch.no_grad(), record_sdpa(calls, label):
            wan(x, t, text, return_dict=False)
        for c, name in zip(calls[n0:], ("self", "cross")):
            c["call"] = name
    except ImportError as e:
        calls.append(
            {
                "model": "wan",
                "form": None,
                "block": None,
                "call": None,
                "q": None,
                "k": None,
                "v": None,
                "mask": None,
                "mask_dtype": None,
                "error": short_error(e),
            }
        )
    # one entry per distinct call, with how often a forward makes it
    uniq: dict[str, dict] = {}
    for c in calls:
        key = json.dumps({k: c.get(k) for k in ("model", "form", "block", "call", "q", "k", "v", "mask")})
        if key in uniq:
            uniq[key]["calls_per_forward"] += 1
        else:
            uniq[key] = {**c, "calls_per_forward": 1}
    return list(uniq.values())


def try_backends(sig: dict, plan: Plan, dev: torch.device, dtype: torch.dtype, deadline: float) -> dict:
    """PyTorch's default SDPA choice and each backend's forward time on real tensors of this call's shapes."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"default_backend": None, "backends": {}, "null_reasons": {}}
    q = torch.randn(sig["q"], device=dev, dtype=dtype)
    k = torch.randn(sig["k"], device=dev, dtype=dtype)
    v = torch.randn(sig["v"], device=dev, dtype=dtype)
    # the keep-mask's values do not change which kernel runs or how fast: all True, the real shape and dtype
    mask = None if sig["mask"] is None else torch.ones(sig["mask"], device=dev, dtype=torch.bool)
    if hasattr(torch, "_fused_sdp_choice"):  # what a plain call dispatches to (private API, present since 2.0)
        out["default_backend"] = SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, False)).name
    else:
        out["null_reasons"]["default_backend"] = "torch._fused_sdp_choice is missing in this torch"
    b, h, lq, _ = q.shape
    score_gib = b * h * lq * k.shape[-2] * 4 / GIB
    for name in BACKENDS:
        res = {"ok": None, "ms": None, "error": None}
        if name == "MATH" and score_gib > plan.math_max_gib:
            res.update(ok=False, error=f"not tried: MATH would materialise {score_gib:.0f} GiB of scores")
        elif time.monotonic() > deadline:
            res.update(ok=False, error="not tried: part deadline")
        else:
            try:
                with warnings.catch_warnings(record=True) as caught, sdpa_kernel(getattr(SDPBackend, name)):
                    warnings.simplefilter("always")
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731, F821 (deleted after the last call)
                    fn()
                    sync(dev)
                    res.update(ok=True, ms=statistics.median(timed_ms(fn, dev) for _ in range(2)))
            except RuntimeError as e:
                why = " | ".join(str(w.message).strip().splitlines()[0] for w in caught)
                res.update(ok=False, error=(why or short_error(e))[:600])
        out["backends"][name] = res
    del q, k, v, mask
    return out


def part_environment(plan: Plan, dev: torch.device, deadline: float, r: dict, report: Report) -> None:
    r.update(
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    )
    for k in ("cuda", "cudnn"):
        if r[k] is None:
            r["null_reasons"][k] = f"this torch build has no {k.upper()}"
    g = r["gpu"]
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        g.update(
            name=p.name,
            capability=list(torch.cuda.get_device_capability(dev)),
            memory_gib=p.total_memory / GIB,
            multiprocessors=p.multi_processor_count,
        )
        try:
            g["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                ).stdout.strip()
                or None
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            g["null_reasons"]["driver"] = f"nvidia-smi: {short_error(e)}"
        if g["driver"] is None and "driver" not in g["null_reasons"]:
            g["null_reasons"]["driver"] = "nvidia-smi printed nothing"
    else:
        for k in ("name", "capability", "memory_gib", "multiprocessors", "driver"):
            g["null_reasons"][k] = "CPU run: no GPU"
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            r["packages"][name]["version"] = str(getattr(mod, "__version__", "unknown"))
        except Exception as e:  # noqa: BLE001 - a broken install is a finding, not a crash
            r["packages"][name]["error"] = short_error(e)
    for name in MODULES:
        try:
            importlib.import_module(name)
            r["project_modules"][name]["ok"] = True
        except Exception as e:  # noqa: BLE001
            r["project_modules"][name].update(ok=False, error=short_error(e))
    report.save()
    sigs = sdpa_signatures(plan)
    for sig in sigs:
        item = {k: sig.get(k) for k in SDPA_ITEM if k not in ("default_backend", "backends", "null_reasons")}
        item.update(dtype="bfloat16", default_backend=None, backends={}, null_reasons={})
        for k in ("form", "block"):  # Wan rows have neither
            if item[k] is None:
                item["null_reasons"][k] = "not a Refiner window call"
        if item["mask"] is None:
            item["null_reasons"]["mask"] = "no attention mask"
        if sig.get("error"):
            item["null_reasons"].update({k: sig["error"] for k in SDPA_ITEM if item.get(k) is None})
        else:
            try:
                res = try_backends(sig, plan, dev, torch.bfloat16, deadline)
                item["null_reasons"].update(res.pop("null_reasons"))
                item.update(res)
            except Exception as e:  # noqa: BLE001
                item["null_reasons"]["default_backend"] = short_error(e)
        r["sdpa"].append(item)
        free_memory()
        report.save()
    summary: dict[str, dict[str, int]] = {}
    for it in r["sdpa"]:
        key = f"{it['model']}" + (f" {it['form']}" if it["form"] else "")
        summary.setdefault(key, {})
        summary[key][str(it["default_backend"])] = summary[key].get(str(it["default_backend"]), 0) + int(
            it["calls_per_forward"] or 0
        )
    r["sdpa_summary"] = summary  # per model/form: attention calls per (2-block Refiner / 1-block Wan) forward


# --- part 2: the paper Refiner ----------------------------------------------------------------------


def refiner_cfg(plan: Plan, **kw):
    from surf_train.models.refiner import RefinerConfig

    return RefinerConfig.preset("paper", **{**plan.refiner, **kw})


def run_cases(report: Report, deadline: float, jobs: list[tuple[dict, float, Callable[[dict], None]]]) -> None:
    """Run (rec, flop, body) jobs in order; a job starts only if the previous one's time per FLOP says it fits.

    Each body is a function, so its model and tensors are freed when it returns (or fails) and the next
    case's peak memory is its own.
    """
    last: tuple[float, float] | None = None  # (seconds, flop) of the previous case
    for rec, flop, body in jobs:
        if too_late(rec, deadline, last and last[0] * flop / last[1]):
            continue
        with case(rec, report):
            body(rec)
            last = (rec["ms"] / 1e3, flop)


@dataclass
class Twin:
    """The compiled twin of an eager case: `first` (compilation + warm-up) runs once, then `call` is timed and its
    output compared with eager_out, the eager case's output of the same inputs."""

    rec: dict
    eager: dict
    eager_out: torch.Tensor | None
    first: Callable[[], Any]
    call: Callable[[], torch.Tensor]
    flop: float


def time_compiled(plan: Plan, part: str, net, twin: Twin, dev: torch.device, deadline: float, report: Report) -> None:
    """Regional compilation of net (in place: after every eager case of the part) and the compiled twin's times,
    when the eager case was measured and its time plus the compile estimate fit the deadline."""
    rec, eager = twin.rec, twin.eager
    if not plan.compile:  # marked skipped by main()
        return
    if eager["status"] != "ok" or twin.eager_out is None:
        rec.update(status="skipped", reason=f"needs the eager case, which is {eager['status']} ({eager['reason']})")
        return
    if too_late(rec, deadline, eager["ms"] / 1e3, plan.compile_estimate_s[part]):
        return
    out: list[torch.Tensor] = []

    def timed():
        out[:] = [twin.call()]

    with case(rec, report), torch.no_grad():
        try:
            net.compile_repeated_blocks(**plan.compile_kwargs)
            sync(dev)
            t0 = time.perf_counter()
            twin.first()
            sync(dev)
            rec["compile_s"] = time.perf_counter() - t0
            measure(rec, timed, dev, deadline, plan.repeats, twin.flop, warmup=0)
        finally:
            torch._dynamo.reset()  # drop the compiled graphs: net is not called again
        rec["warmup"] = 1
        compare(rec, eager, twin.eager_out, out[0])


def compare(rec: dict, eager: dict, ref: torch.Tensor, got: torch.Tensor) -> None:
    """Compiled against eager: the speedup, and the largest output difference, also over the largest |output|
    (bf16 outputs: an absolute difference means little without the scale)."""
    ref, got = ref.float(), got.float()
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    rec.update(eager_ms=eager["ms"], speedup=eager["ms"] / rec["ms"], max_abs_diff=diff, out_abs_max=scale)
    if "output_finite" in rec:
        rec["output_finite"] = bool(torch.isfinite(got).all())
    if scale > 0:
        rec["rel_diff"] = diff / scale
    else:
        rec["null_reasons"]["rel_diff"] = "the eager output is all zeros"


def part_refiner_train(plan: Plan, dev: torch.device, deadline: float, r: dict, report: Report) -> None:
    from surf_train.cost import refiner_flops, total
    from surf_train.models.refiner import Refiner, num_params
    from surf_train.models.refiner import text_padding_mask as text_mask
    from surf_train.training.objective import BridgeConfig, bridge_loss

    lat, prev = tuple(r["latent"]), tuple(r["preview_latent"])
    r["config"] = {**refiner_cfg(plan).to_dict(), "attn_impl": "per case"}

    def train_case(rec: dict, cfg, flop: float) -> None:
        torch.manual_seed(0)
        with torch.device(dev):
            net = Refiner.from_cfg(cfg).train()
            target, preview = torch.randn(1, *lat), torch.randn(1, *prev)  # (1, C, F, H, W), (1, C, F, h, w)
            text = torch.randn(1, plan.text_len, cfg.text_dim)  # (1, L, D) umT5-like, all tokens real
        r["params"] = num_params(net)
        opt = torch.optim.AdamW(net.parameters(), lr=5e-5)
        mask, bridge = text_mask(text), BridgeConfig()  # what the Refiner derives itself: a keep-mask over the text
        losses: list[torch.Tensor] = []

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = bridge_loss(lambda x, t, c, txt: net(x, t, c, txt, mask), preview, target, bridge, text)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[:] = [loss.detach()]  # no .item(): that would be a host sync inside the timed step

        measure(rec, step, dev, deadline, plan.repeats, flop)
        rec["loss"] = float(losses[0])

    jobs = []
    for impl, rec in r["cases"].items():
        cfg = refiner_cfg(plan, attn_impl=impl)
        flop = 3 * total(refiner_flops(cfg, lat, plan.text_len, impl=impl))
        jobs.append((rec, flop, lambda rec, cfg=cfg, flop=flop: train_case(rec, cfg, flop)))
    run_cases(report, deadline, jobs)
    g, m = r["cases"]["grouped"], r["cases"]["mask"]
    if g["ms"] and m["ms"]:
        r["mask_over_grouped"] = m["ms"] / g["ms"]
    else:
        r["null_reasons"]["mask_over_grouped"] = "needs both cases measured"
    if r["params"] is None:
        r["null_reasons"]["params"] = "no case built the model"


def refiner_in_dtype(cfg, dtype: torch.dtype):
    """An eval Refiner as from_pretrained(torch_dtype=dtype) loads one: the modules it keeps in float32 (adaLN
    tables, qk and text norms, the time MLP) stay float32; `.to(dtype)` would cast them too."""
    from surf_train.models.refiner import Refiner

    return Refiner.from_cfg(cfg).to_dtype(dtype).eval().requires_grad_(False)


def part_refiner_sample(plan: Plan, dev: torch.device, deadline: float, r: dict, report: Report) -> None:
    from surf_train.cost import refiner_flops, total
    from surf_train.models.refiner import text_padding_mask as text_mask
    from surf_train.models.sampler import RefinerSampler

    cfg = refiner_cfg(plan, grad_checkpointing=False)
    r["config"] = cfg.to_dict()
    torch.manual_seed(0)
    with torch.device(dev):
        net = refiner_in_dtype(cfg, torch.bfloat16)
        text = torch.randn(1, plan.text_len, cfg.text_dim, dtype=torch.bfloat16)  # (1, L, D)
    mask = text_mask(text)
    k = plan.sample_steps
    reserve = plan.compile_reserve_s["refiner_sample"] if plan.compile else 0.0
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # case -> (x_up, eager output) for its compiled twin

    def velocity(x, t, c, txt):
        return net(x, t, c, txt, mask, return_dict=False)[0]

    def one_step(x_up):  # warm-up: one step at this shape
        return RefinerSampler(steps=1).refine(velocity, x_up, text=text)

    def k_steps(x_up):  # start_noise 0: the same output at every call
        return RefinerSampler(steps=k).refine(velocity, x_up, text=text)

    def sample_case(rec: dict, name: str, flop: float) -> None:
        x_up = torch.randn(1, *rec["latent"], device=dev, dtype=torch.bfloat16)  # (1, C, F, H, W) upsampled preview
        one_step(x_up)
        out: list[torch.Tensor] = []

        def timed():
            out[:] = [k_steps(x_up)]

        measure(rec, timed, dev, deadline - reserve, max(1, plan.repeats - 1), flop, warmup=0)
        rec.update(warmup=1, per_step_ms=rec["ms"] / k)
        if name in r["compiled"]:
            kept[name] = (x_up, out[0])

    jobs, flops = [], {}
    for name, rec in r["cases"].items():
        flops[name] = k * total(refiner_flops(cfg, tuple(rec["latent"]), plan.text_len))
        jobs.append((rec, flops[name], lambda rec, name=name: sample_case(rec, name, flops[name])))
    run_cases(report, deadline, jobs)
    for name, rec in r["compiled"].items():  # after every eager case: compilation changes net in place
        x_up, ref = kept.pop(name, (None, None))
        first, call = (lambda x=x_up: one_step(x)), (lambda x=x_up: k_steps(x))
        time_compiled(
            plan,
            "refiner_sample",
            net,
            Twin(rec, r["cases"][name], ref, first, call, flops[name]),
            dev,
            deadline,
            report,
        )
        if rec["status"] == "ok":
            rec["per_step_ms"] = rec["ms"] / k


# --- part 3: Wan 2.1 14B and the composed run times -----------------------------------------------

BASE_STAGES = ("base", "prefix", "preview")  # base-model stages: one step = one batched (CFG) forward


def compose(costs: dict, step_s: dict[str, float | None]) -> dict:
    """Seconds of the baseline and SURF runs of flops.run_costs(...) from measured seconds per step.

    step_s maps a stage ("base", "prefix", "preview", "refine") to the seconds of one step: for the base model
    one forward at batch cfg_factor (the CFG pair), for the Refiner one sampler step. Steps per stage are the
    stage's calls over the CFG factor (base model) or its calls (Refiner).
    """
    cfg = costs["settings"]["cfg_factor"]
    rows, missing = [], []
    for st in costs["stages"]:
        steps = st["calls"] // cfg if st["stage"] in BASE_STAGES else st["calls"]
        per = step_s.get(st["stage"])
        if per is None:
            missing.append(st["stage"])
        rows.append(
            {
                "run": st["run"],
                "stage": st["stage"],
                "size": st["size"],
                "steps": steps,
                "s_per_step": per,
                "s": None if per is None else steps * per,
            }
        )
    out = {"baseline_s": None, "surf_s": None, "speedup": None, "stages": rows, "null_reasons": {}}
    if missing:
        why = f"no measured step time for stage(s) {sorted(set(missing))}"
        out["null_reasons"] = {"baseline_s": why, "surf_s": why, "speedup": why}
        for row in rows:
            if row["s"] is None:
                row["null_reasons"] = {"s_per_step": "not measured", "s": "not measured"}
        if all(r["s"] is not None for r in rows if r["run"] == "baseline"):
            out["baseline_s"] = sum(r["s"] for r in rows if r["run"] == "baseline")
            del out["null_reasons"]["baseline_s"]
        return out
    out["baseline_s"] = sum(r["s"] for r in rows if r["run"] == "baseline")
    out["surf_s"] = sum(r["s"] for r in rows if r["run"] == "surf")
    out["speedup"] = out["baseline_s"] / out["surf_s"]
    return out


def wan_on_device(config: dict, dev: torch.device, dtype: torch.dtype):
    """WanTransformer3DModel built on the meta device, materialised on `dev` with random weights (no download)."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        net = WanTransformer3DModel(**config).to(dtype)
    # as from_pretrained(torch_dtype=bf16) does: the model's _keep_in_fp32_modules (time embedder, norms,
    # adaLN tables) stay float32
    keep = set(getattr(net, "_keep_in_fp32_modules", None) or [])
    for mname, mod in net.named_modules():  # matched on parameter names, as diffusers' loader does
        for pname, prm in list(mod.named_parameters(recurse=False)):
            if keep & set(f"{mname}.{pname}".split(".")):
                mod._parameters[pname] = torch.nn.Parameter(prm.float(), requires_grad=prm.requires_grad)
    net = net.to_empty(device=dev)  # uninitialised storage on dev, no host copy of 28 GB
    # the RoPE tables are the only buffers (non-persistent, computed in __init__): rebuild them for real
    c = net.config
    with torch.device(dev):
        net.rope = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len)
    other = [n for n, _ in net.named_buffers() if not n.startswith("rope.")]
    if other:
        raise RuntimeError(f"buffers other than RoPE would stay uninitialised: {other[:5]}")
    gen = None if dev.type == "meta" else torch.Generator(dev).manual_seed(0)  # meta: shapes-only tests
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:  # norm scales 1, shifts 0: activations stay in range
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:  # std 0.02, the usual transformer init scale
                p.normal_(0.0, 0.02, generator=gen)
    return net.eval().requires_grad_(False)


def time_forwards(
    net, arch: dict, names: tuple[str, ...], plan: Plan, dev, deadline: float, r: dict, report, reserve_s: float = 0.0
) -> dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor, float]]:
    """One timed forward of a Wan transformer per case in `names`, at batch r["batch"] (CFG) in bf16; the timestep
    per token where `arch` expands timesteps (Wan 2.2 TI2V-5B, patch 2), else per sample; FLOPs from wan_flops.
    The repeats stop reserve_s before the deadline. Returns, per case with a compiled twin in r["compiled"], its
    forward (the same inputs), eager output and FLOPs."""
    from surf_train.cost import total, wan_flops

    b = r["batch"]
    kept: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor, float]] = {}
    text = torch.randn(b, plan.text_len, arch["text_dim"], device=dev, dtype=torch.bfloat16)  # (2, L, 4096)

    def forward_case(rec: dict, name: str, flop: float) -> None:
        c, f, h, w = rec["latent"]
        x = torch.randn(b, c, f, h, w, device=dev, dtype=torch.bfloat16)
        shape = (b, f * (h // 2) * (w // 2)) if arch.get("expand_timesteps") else (b,)
        t = torch.full(shape, 500.0, device=dev)  # Wan's timestep scale is [0, 1000]
        out: list[torch.Tensor] = []

        def call() -> torch.Tensor:
            return net(x, t, text, return_dict=False)[0]

        def fwd():
            out[:] = [call()]

        with torch.no_grad():
            measure(rec, fwd, dev, deadline - reserve_s, plan.repeats, flop)
        rec["output_finite"] = bool(torch.isfinite(out[0]).all())
        if name in r.get("compiled", {}):
            kept[name] = (call, out[0], flop)

    jobs = []
    for name in names:
        rec = r["cases"][name]
        flop = total(wan_flops(arch, tuple(rec["latent"]), plan.text_len, batch=b))
        jobs.append((rec, flop, lambda rec, name=name, flop=flop: forward_case(rec, name, flop)))
    run_cases(report, deadline, jobs)
    return kept


def part_wan14b(
    plan: Plan,
    dev: torch.device,
    deadline: float,
    r: dict,
    report: Report,
    refiner_step_s: float | None,
    refiner_why: str,
) -> None:
    from surf_train.cost import ARCH, PAPER, run_costs

    settings = run_settings()
    costs = run_costs(settings)
    paper = PAPER[settings.model]
    r["flops_prediction"] = {
        "baseline_pflops": costs["baseline_pflops"],
        "surf_pflops": costs["surf_pflops"],
        "speedup": costs["speedup"],
    }
    r["paper"] = {"baseline_s": paper["baseline_s"], "surf_s": paper["surf_s"], "speedup": paper["speedup_time"]}
    config = {**ARCH[settings.model], **plan.wan}
    net = wan_on_device(config, dev, torch.bfloat16)
    r["config"] = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(net.config).items() if not k.startswith("_")
    }
    r["params"] = sum(p.numel() for p in net.parameters())
    report.save()
    # cheapest first: 240p warms up the kernels and its time per FLOP decides whether 720p fits the deadline
    reserve = plan.compile_reserve_s["wan14b"] if plan.compile else 0.0
    kept = time_forwards(net, config, ("preview", "prefix", "target"), plan, dev, deadline, r, report, reserve)
    for name, rec in r["compiled"].items():  # after every eager case: compilation changes net in place
        call, ref, flop = kept.pop(name, (None, None, 0.0))
        time_compiled(plan, "wan14b", net, Twin(rec, r["cases"][name], ref, call, call, flop), dev, deadline, report)
    del net, kept
    free_memory()
    step_s = {
        "base": r["cases"]["target"]["ms"],
        "prefix": r["cases"]["prefix"]["ms"],
        "preview": r["cases"]["preview"]["ms"],
    }
    step_s = {k: None if v is None else v / 1e3 for k, v in step_s.items()}
    step_s["refine"] = refiner_step_s
    r["composition"] = compose(costs, step_s)
    if refiner_step_s is None:
        r["composition"]["refiner_step_source"] = None
        r["composition"]["null_reasons"]["refiner_step_source"] = refiner_why
    else:
        r["composition"]["refiner_step_source"] = "refiner_sample.cases.target.per_step_ms"
    if r["composition"]["speedup"] is not None:
        r["measured_over_predicted"] = r["composition"]["speedup"] / costs["speedup"]
    else:
        r["null_reasons"]["measured_over_predicted"] = "no measured speedup"


# --- part 4: Lightning + DeepSpeed ZeRO-2 through the project's entry points --------------------------


def write_shards(directory: Path, target: tuple[int, ...], text: tuple[int, int], n_shards: int, per_shard: int):
    """Random (preview, target, text) pairs in the project's shard schema (surf_train.data.shards)."""
    from surf_train.data.shards import ShardWriter, encode_sample

    c, f, h, w = target
    gen = torch.Generator().manual_seed(0)
    with ShardWriter(directory, rank=0, max_count=per_shard) as writer:
        for i in range(n_shards * per_shard):
            tgt = torch.randn(c, f, h, w, generator=gen)
            prev = torch.nn.functional.avg_pool2d(tgt, 2) + 0.1 * torch.randn(c, f, h // 2, w // 2, generator=gen)
            txt = torch.randn(*text, generator=gen)
            txt[text[0] * 3 // 4 :] = 0  # zero padding, as the text encoders pad prompts
            tensors = {"preview": prev.half(), "target": tgt.half(), "text": txt.half()}
            writer.write(encode_sample(f"gpucheck{i:04d}", tensors, {"source": "gpu_check", "seed": i}))
    return writer.shards


def train_overrides(plan: Plan, shards: Path, run_dir: Path) -> list[str]:
    """Hydra overrides of `python -m surf_train`: the `wan` experiment (bf16-mixed, ZeRO-2, EMA) shrunk to 5 steps
    of a mid-sized Refiner on one device."""
    model = [
        f"model.{k}={json.dumps(list(v) if isinstance(v, tuple) else v).replace(' ', '')}"
        for k, v in plan.ds_model.items()
    ]
    return [
        "+experiment=wan",
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        "name=gpu_check",
        "logger=none",
        "module.decode_base=null",
        "trainer.devices=1",
        "trainer.max_steps=5",
        "ckpt_every=5",
        "data.val_samples=2",
        "trainer.enable_progress_bar=false",
        "module.optim.warmup_steps=1",
        *model,
        *plan.ds_extra,
    ]


def part_ti2v5b(plan: Plan, dev: torch.device, deadline: float, r: dict, report: Report) -> None:
    """Per-call forwards of a TI2V-5B-shaped transformer with per-token timesteps, as WanPipeline runs it."""
    from surf_train.cost import ARCH

    arch = {**ARCH["wan2.2_ti2v_5b"], **plan.ti2v}
    config = {k: v for k, v in arch.items() if k != "expand_timesteps"}  # a pipeline option, not the model's
    net = wan_on_device(config, dev, torch.bfloat16)
    r["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(net.config).items() if k[0] != "_"}
    r["params"] = sum(p.numel() for p in net.parameters())
    report.save()
    time_forwards(net, arch, ("preview", "target"), plan, dev, deadline, r, report)  # cheapest first, as wan14b
    del net
    free_memory()


def part_lightning_deepspeed(plan: Plan, dev: torch.device, deadline: float, r: dict, report: Report) -> None:
    from surf_train.models.loading import load_refiner
    from surf_train.models.refiner import num_params
    from surf_train.models.refiner import text_padding_mask as text_mask
    from surf_train.training.checkpoint import read_checkpoint

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = report.out_dir / f"{report.stem}.lightning.log"
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        shards = work / "shards"
        r["shards"] = {
            "count": write_shards(shards, plan.ds_target, plan.ds_text, 4, 2),
            "per_shard": 2,
            "target": list(plan.ds_target),
            "text": list(plan.ds_text),
        }
        cmd = [sys.executable, "-m", "surf_train", *train_overrides(plan, shards, work / "run")]
        r["command"] = shlex.join([Path(cmd[0]).name, *cmd[1:]]).replace(str(work), "$WORK")
        report.save()
        t0 = time.monotonic()
        tr = r["train"]
        with open(log_path, "w") as log:
            try:
                p = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=max(10.0, deadline - time.monotonic() - 20),
                )
                tr["returncode"] = p.returncode
            except subprocess.TimeoutExpired:
                tr["returncode"] = "timeout"
        tr["wall_s"] = time.monotonic() - t0
        tr["log_tail"] = log_path.read_text(errors="replace")[-3000:]
        summary = work / "run" / "summary.json"
        if tr["returncode"] != 0 or not summary.is_file():
            raise RuntimeError(f"python -m surf_train exited {tr['returncode']} (log: {log_path.name})")
        tr["summary"] = json.loads(summary.read_text())
        tr["null_reasons"]["log_tail"] = "kept only when training fails (the whole log is the .lightning.log file)"
        tr["log_tail"] = None
        ckpt = work / "run" / "checkpoints" / "last.ckpt"
        files = sorted(str(f.relative_to(ckpt)) for f in ckpt.rglob("*") if f.is_file()) if ckpt.is_dir() else []
        r["checkpoint"] = {
            "path_is_dir": ckpt.is_dir(),
            "files": files,
            "mbytes": sum(f.stat().st_size for f in ckpt.resolve().rglob("*") if f.is_file()) / 1e6
            if ckpt.is_dir()
            else ckpt.resolve().stat().st_size / 1e6,
        }
        report.save()
        ex = r["export"]
        t0 = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "surf_train.export", str(ckpt), str(work / "export")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(10.0, deadline - time.monotonic()),
        )
        ex.update(
            returncode=p.returncode,
            wall_s=time.monotonic() - t0,
            output=(p.stdout + p.stderr).strip()[-1500:].replace(str(work), "$WORK"),
        )
        if p.returncode != 0:
            raise RuntimeError(f"python -m surf_train.export exited {p.returncode}: {ex['output'][-300:]}")
        ld = r["load"]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.monotonic()
        net, meta = load_refiner(work / "export", device=dev)
        state, _, _ = read_checkpoint(ckpt)
        prefix = "ema.module." if meta["weights"] == "ema" else "net."
        ex["max_abs_diff"] = max(
            float((v.float().cpu() - state[prefix + k].float()).abs().max()) for k, v in net.state_dict().items()
        )
        r["params"] = num_params(net)
        c, f, h, w = plan.ds_target
        x = torch.randn(1, c, f, h, w, device=dev)
        text = torch.randn(1, *plan.ds_text, device=dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            y = net(x, torch.full((1,), 0.5, device=dev), x, text, text_mask(text)).sample
        ld.update(wall_s=time.monotonic() - t0, dtype=meta["dtype"], forward_finite=bool(torch.isfinite(y).all()))
        if dev.type == "cuda":
            ld["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
        else:
            ld["null_reasons"]["peak_mem_gib"] = CPU_MEM


# --- driver ----------------------------------------------------------------------------------------


def run_part(name: str, report: Report, fn: Callable[[float, dict, Report], None], deadline: float) -> None:
    """Run a part under its deadline; missing dependencies skip it, other failures are recorded."""
    part = report.doc["parts"][name]
    part["deadline_s"] = round(deadline - time.monotonic(), 1)
    part["status"] = "running"
    report.save()
    t0 = time.monotonic()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # kept in the JSON: e.g. a fused kernel not taken
            warnings.simplefilter("always")
            fn(deadline, part["results"], report)
        cases = part["results"].get("cases", {})
        bad = [f"{k}: {c['reason']}" for k, c in all_cases(part["results"]) if c["status"] != "ok"]
        part["status"], part["reason"] = "ok", "; ".join(bad) or None
        if cases and all(c["status"] != "ok" for c in cases.values()):  # the eager cases decide
            part["status"] = "failed"
    except ImportError as e:
        part.update(status="skipped", reason=f"missing dependency: {short_error(e)}")
    except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
        part.update(status="failed", reason=short_error(e), traceback=traceback.format_exc()[-2000:])
    finally:
        free_memory()
    seen = dict.fromkeys(f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:300]}" for w in caught)
    part["warnings"] = list(seen)[:30]
    for _, c in all_cases(part["results"]):  # cases a failed part never reached
        if c["status"] in ("pending", "running"):
            c.update(status="skipped", reason=f"part {part['status']}: {part['reason']}")
    part["wall_s"] = round(time.monotonic() - t0, 2)
    report.save()
    print(
        f"[gpu_check] {name}: {part['status']} in {part['wall_s']:.1f} s"
        + (f" ({part['reason']})" if part["reason"] else ""),
        flush=True,
    )


def markdown(doc: dict) -> str:
    """The summary table (also printed)."""

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    dev = doc["device"]
    env = doc["parts"]["environment"]["results"]
    lines = [
        f"# GPU check: {dev['name'] or '?'}{' (DRY RUN on CPU, tiny shapes)' if doc['dry_run'] else ''}",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, started {doc['started_utc']}, wall {f(doc['wall_s'])} s "
        f"of a {doc['budget_s']} s budget; `{doc['command']}`",
        "",
        "| part | case | status | ms | peak GiB | TFLOP | TFLOP/s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pname, part in doc["parts"].items():
        cases = part["results"].get("cases")
        if not cases:
            lines.append(f"| {pname} | | {part['status']} | | | | | {part['reason'] or ''} |")
            continue
        for cname, c in cases.items():
            label = cname + (f" {c['size']}" if c.get("size") else "")
            note = c["reason"] or (f"loss {c['loss']:.3g}" if c.get("loss") is not None else "")
            lines.append(
                f"| {pname} | {label} | {c['status']} | {f(c['ms'])} | {f(c['peak_mem_gib'], '{:.2f}')} | "
                f"{f(c['tflop'], '{:.3g}')} | {f(c['tflops_per_s'], '{:.3g}')} | {note} |"
            )
    lines += compiled_lines(doc)
    comp = doc["parts"]["wan14b"]["results"]
    cm = comp["composition"]
    lines += [
        "",
        "Wan 2.1 14B, 720p x 81 frames: composed from the measured steps",
        "",
        "| run | stage | size | steps | s/step | s |",
        "|---|---|---|---|---|---|",
    ]
    for row in cm["stages"]:
        lines.append(
            f"| {row['run']} | {row['stage']} | {row['size']} | {row['steps']} | "
            f"{f(row['s_per_step'], '{:.3f}')} | {f(row['s'])} |"
        )
    fp, pp = comp["flops_prediction"], comp["paper"]
    lines += [
        "",
        "| | baseline s | SURF s | speedup |",
        "|---|---|---|---|",
        f"| measured here (composed) | {f(cm['baseline_s'])} | {f(cm['surf_s'])} | {f(cm['speedup'], '{:.2f}')} |",
        f"| paper | {f(pp['baseline_s'], '{:.0f}')} | {f(pp['surf_s'], '{:.0f}')} | {f(pp['speedup'], '{:.2f}')} |",
        f"| surf_train.flops prediction | {f(fp['baseline_pflops'])} PFLOP | {f(fp['surf_pflops'])} PFLOP | "
        f"{f(fp['speedup'], '{:.2f}')} |",
        "",
    ]
    if env["sdpa"]:
        lines += [
            "SDPA backends per attention call (default = what a plain call dispatches to; ms of one forward "
            "with the backend forced, x = not available)",
            "",
            "| model | form | block | call | n | q | k | mask | default | " + " | ".join(BACKENDS) + " |",
            "|" + "---|" * (9 + len(BACKENDS)),
        ]
        for s in env["sdpa"]:
            cells = [
                f(b.get("ms"), "{:.3f}") if b.get("ok") else "x" for b in (s["backends"].get(n, {}) for n in BACKENDS)
            ]
            lines.append(
                f"| {s['model']} | {s['form'] or ''} | {s['block'] or ''} | {s['call']} | "
                f"{s['calls_per_forward']} | {s['q']} | {s['k']} | {s['mask'] or ''} | "
                f"{s['default_backend']} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    ld = doc["parts"]["lightning_deepspeed"]["results"]
    sm = ld["train"]["summary"] or {}
    lines += [
        f"Lightning + DeepSpeed: {doc['parts']['lightning_deepspeed']['status']}; steps {sm.get('steps')}, "
        f"train loss {sm.get('train_loss_first')} -> {sm.get('train_loss_last')}, val mse refiner "
        f"{sm.get('val_mse_refiner')} vs upsample {sm.get('val_mse_upsample')}; "
        f"train {f(ld['train']['wall_s'])} s, "
        f"export {f(ld['export']['wall_s'])} s (max |export - checkpoint| {ld['export']['max_abs_diff']}), "
        f"load + forward finite: {ld['load']['forward_finite']}",
        "",
    ]
    return "\n".join(lines)


def compiled_lines(doc: dict) -> list[str]:
    """The table of the compiled cases against their eager twins."""

    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    c = doc["compile"]
    lines = [
        "",
        f"Regional compilation, `{c['call']}`{'' if c['enabled'] else ' (off: --no-compile)'}, against eager "
        "(compile s = the first compiled call, compilation included; diff = max |compiled - eager| over max |eager|)",
        "",
        "| part | case | status | eager ms | compiled ms | speedup | compile s | max abs diff | rel diff | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pname, part in doc["parts"].items():
        for cname, r in part["results"].get("compiled", {}).items():
            lines.append(
                f"| {pname} | {cname} {r['size']} | {r['status']} | {f(r['eager_ms'], '{:.1f}')} | "
                f"{f(r['ms'], '{:.1f}')} | {f(r['speedup'], '{:.2f}')} | {f(r['compile_s'], '{:.1f}')} | "
                f"{f(r['max_abs_diff'], '{:.3g}')} | {f(r['rel_diff'], '{:.2g}')} | {r['reason'] or ''} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every part on CPU at tiny shapes (seconds)")
    ap.add_argument("--out-dir", help="default benchmarks/results/gpu (outputs/gpu_check with --dry-run)")
    ap.add_argument("--budget-s", type=float, help="whole-run budget in seconds (default 420, dry run 110)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time regional compilation against eager at the target case of refiner_sample and wan14b (default on)",
    )
    a = ap.parse_args(argv)
    parts = [p for p in a.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if not a.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run for the CPU rehearsal at tiny shapes", file=sys.stderr)
        return 2
    plan = Plan.dry() if a.dry_run else Plan(dry_run=False)
    plan.compile = a.compile
    budget = a.budget_s or (110.0 if a.dry_run else 420.0)
    t_start = time.monotonic()
    # a hang (a stuck kernel or collective) must not eat the lease: dump the stacks and exit; the JSON is on disk
    faulthandler.dump_traceback_later(budget + 90, exit=True)
    dev = torch.device("cpu") if a.dry_run else torch.device("cuda", torch.cuda.current_device())
    name = "dry-run-cpu" if a.dry_run else torch.cuda.get_device_name(dev)
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")
    out_dir = Path(a.out_dir or (ROOT / ("outputs/gpu_check" if a.dry_run else "benchmarks/results/gpu")))
    doc = skeleton(plan)
    args = sys.argv[1:] if argv is None else argv
    doc.update(
        command=shlex.join(["python3", "benchmarks/gpu_check.py", *args]),
        started_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        budget_s=budget,
        device={"type": dev.type, "name": name, "file_stem": stem},
    )
    report = Report(plan, out_dir, stem, doc)
    for p in PARTS:
        if p not in parts:
            doc["parts"][p].update(status="skipped", reason="not in --parts")
            for _, c in all_cases(doc["parts"][p]["results"]):
                c.update(status="skipped", reason="part not in --parts")
        elif not plan.compile:
            for c in doc["parts"][p]["results"].get("compiled", {}).values():
                c.update(status="skipped", reason="--no-compile")
    report.save()
    torch.manual_seed(0)
    if a.dry_run:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))

    def deadline_for(name: str) -> float | None:
        """Now + the part's cap, less what the later selected parts need at least; None: no time left."""
        later = sum(plan.floors[p] for p in PARTS[PARTS.index(name) + 1 :] if p in parts)
        left = t_start + budget - time.monotonic() - later
        if left < plan.floors[name]:
            return None
        return time.monotonic() + min(plan.caps[name], left)

    fns = {
        "environment": part_environment,
        "refiner_train": part_refiner_train,
        "refiner_sample": part_refiner_sample,
        "wan14b": part_wan14b,
        "ti2v5b": part_ti2v5b,
        "lightning_deepspeed": part_lightning_deepspeed,
    }
    for p in PARTS:
        if p not in parts:
            continue
        dl = deadline_for(p)
        if dl is None:
            doc["parts"][p].update(status="skipped", reason=f"run budget of {budget:.0f} s spent")
            report.save()
            continue
        extra: tuple = ()
        if p == "wan14b":  # SURF's Refiner stage takes its step time from refiner_sample's 720p case
            s = doc["parts"]["refiner_sample"]
            rec = s["results"]["cases"]["target"]
            why = f"refiner_sample target case: {rec['status']} ({rec['reason'] or s['reason']})"
            extra = (None if rec["per_step_ms"] is None else rec["per_step_ms"] / 1e3, why)
        run_part(p, report, lambda dl_, r, rep, fn=fns[p], extra=extra: fn(plan, dev, dl_, r, rep, *extra), dl)
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    doc["complete"] = all(doc["parts"][p]["status"] in ("ok", "skipped", "failed") for p in PARTS)
    report.save()
    faulthandler.cancel_dump_traceback_later()
    print(markdown(doc))
    print(f"[gpu_check] wrote {report.json_path} and .md in {doc['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
