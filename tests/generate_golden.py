"""Fixed-seed `surf-generate` runs whose outputs were recorded before generate() became a layer over SurfPipeline.

    PYTHONPATH=. python tests/generate_golden.py   # re-record tests/data/generate_golden.* (only on purpose)

Each case runs `surf_train.generate.generate` on a tiny base model with a tiny seeded Refiner and captures the
latent handed to the VAE and the decoded video (float32) by wrapping `surf_train.base.vae.decode`. The recording
holds the latents themselves (.npz) and sha256 hashes of their and the videos' float32 bytes (.json).
The three `surf` cases were re-recorded when the Refiner began masking zero text rows itself (issue 14): the
generation path had attended to the text padding that training masks. The other cases did not change.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"
GOLDEN_JSON, GOLDEN_NPZ = DATA / "generate_golden.json", DATA / "generate_golden.npz"
SMALL = dict(
    height=64,
    width=64,
    frames=9,
    prefix_height=64,
    prefix_width=64,
    steps=4,
    switch=1,
    progress=False,
    prompts=["a cat playing piano"],
    seeds=[3],
)
# name -> (base, refiner text_dim, GenerateConfig overrides)
CASES = {
    "wan_surf": ("tiny", 32, dict(mode="surf")),
    "wan_surf_paper_accel": (
        "tiny",
        32,
        dict(mode="surf", rule="paper", cfg_stop=2, cache_threshold=0.5, refiner_steps=2),
    ),
    "wan_baseline": ("tiny", 32, dict(mode="baseline")),
    "wan_preview": ("tiny", 32, dict(mode="preview", rule="snr", down="bilinear")),
    "hunyuan_surf": ("tiny_hunyuan", 16, dict(mode="surf", steps=3, switch=2)),
    "hunyuan_baseline": ("tiny_hunyuan", 16, dict(mode="baseline", steps=3)),
}


def sha(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def tiny_refiner(base: str, text_dim: int, out: Path) -> tuple[Path, str]:
    """A seeded tiny Refiner for `base`, exported to `out`; returns the directory and a hash of its weights."""
    from surf_train.base import BaseSpec
    from surf_train.models.refiner import Refiner, RefinerConfig
    from surf_train.training.export import save_refiner

    spec = BaseSpec.from_name(base)
    patch = (1, spec.patch_s, spec.patch_s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = Refiner.from_cfg(
            RefinerConfig(
                in_channels=spec.channels,
                patch_size=patch,
                dim=32,
                depth=2,
                heads=2,
                text_dim=text_dim,
                window=(2, 2, 2),
            )
        )
        torch.nn.init.normal_(net.proj_out.weight, std=0.02)
    h = hashlib.sha256(b"".join(v.float().numpy().tobytes() for _, v in sorted(net.state_dict().items())))
    d = save_refiner(
        net.state_dict(),
        net.cfg,
        out,
        bridge={"steps": 3, "sigma_aug_eval": 0.05},
        trained_on={"base": {"name": spec.name, "id": spec.model_id, "revision": spec.revision, "family": spec.family}},
    )
    return d, h.hexdigest()


def run_case(name: str, work: Path, generate=None) -> dict:
    """Run one case; returns {"latent": tensor, "video": tensor, "report": dict, "refiner_sha": str}."""
    import surf_train.base.vae as vae_io
    from surf_train.generate import GenerateConfig
    from surf_train.generate import generate as default_generate

    base, text_dim, kw = CASES[name]
    ref, ref_sha = tiny_refiner(base, text_dim, work / f"refiner_{base}")
    seen, decode = [], vae_io.decode

    def recording(family, vae, latent, device):
        video = decode(family, vae, latent, device)
        seen.append((latent.detach().float().cpu().clone(), video.detach().float().cpu().clone()))
        return video

    vae_io.decode = recording
    try:
        (report,) = (generate or default_generate)(
            GenerateConfig(**{**SMALL, **kw}, base=base, refiner=str(ref), out_dir=str(work / name))
        )
    finally:
        vae_io.decode = decode
    ((latent, video),) = seen
    return {"latent": latent, "video": video, "report": report, "refiner_sha": ref_sha}


def record() -> None:
    import tempfile

    torch.set_num_threads(1)
    golden, arrays = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            r = run_case(name, Path(tmp))
            arrays[name] = r["latent"].numpy()
            golden[name] = {
                "latent_sha256": sha(r["latent"]),
                "video_sha256": sha(r["video"]),
                "latent_shape": list(r["latent"].shape),
                "video_shape": list(r["video"].shape),
                "refiner_sha256": r["refiner_sha"],
                "calls": r["report"]["calls"],
                "forwards": r["report"]["forwards"],
                "flops": r["report"]["flops"],
            }
            print(name, golden[name]["latent_sha256"][:16], golden[name]["calls"], file=sys.stderr)
    DATA.mkdir(exist_ok=True)
    GOLDEN_JSON.write_text(json.dumps({"torch": torch.__version__, "cases": golden}, indent=1) + "\n")
    np.savez_compressed(GOLDEN_NPZ, **arrays)


if __name__ == "__main__":
    record()
