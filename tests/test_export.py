import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import free_port, kill_tree
from test_train import FAST, SHRINK, compose_cfg

from surf_train.common.errors import ConfigError
from surf_train.models.loading import load_refiner
from surf_train.training.checkpoint import read_checkpoint
from surf_train.training.export import export
from surf_train.training.module import RefinerModule
from surf_train.training.train import train

ROOT = Path(__file__).resolve().parents[1]


def inputs(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 8, 8, generator=g)
    return (
        x,
        torch.rand(2, generator=g),
        torch.randn(2, 16, 3, 8, 8, generator=g),
        torch.randn(2, 16, net.cfg.text_dim, generator=g),
    )


@pytest.fixture(scope="module")
def plain_ckpt(pairs, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(
        compose_cfg(
            [
                f"data.shards={pairs}",
                f"run_dir={run}",
                "trainer.max_steps=3",
                "ckpt_every=3",
                "data.val_samples=0",
                "module.ema_decay=0.5",
                *SHRINK,
                *FAST,
            ]
        )
    )
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_exported_refiner_matches_the_checkpoint(plain_ckpt, tmp_path, weights):
    out = export(plain_ckpt, tmp_path / "exp", weights=weights)
    net, meta = load_refiner(out)
    assert meta["weights"] == weights and meta["step"] == 3 and meta["refiner"]["dim"] == 32
    module = RefinerModule.load_from_checkpoint(plain_ckpt, weights_only=True)
    ref = (module.ema.module if weights == "ema" else module.net).eval()
    args = inputs(net)
    assert torch.equal(net(*args).sample, ref(*args).sample)
    other = module.net if weights == "ema" else module.ema.module
    assert not torch.allclose(net(*args).sample, other.eval()(*args).sample)  # raw and EMA really differ


def test_export_dtype_and_cli(plain_ckpt, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "surf_train.export", str(plain_ckpt), str(tmp_path / "bf"), "--dtype", "bfloat16"]
        + ["--steps", "3", "--start-noise", "0.25", "--consistency", "on"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "exported ema weights of step 3 (bfloat16)" in r.stdout
    net, meta = load_refiner(tmp_path / "bf")
    trained = read_checkpoint(plain_ckpt)[1]["bridge"]  # the three sampler flags replace those and nothing else
    assert meta["bridge"] == {**trained, "steps": 3, "sigma_aug_eval": 0.25, "consistency": True}
    assert trained["steps"] != 3 and trained["sigma_aug_eval"] != 0.25 and not trained["consistency"]
    assert net.dtype == net.patch_embedding.weight.dtype == torch.bfloat16
    # stored and loaded in float32: the modules diffusers keeps in float32 (Refiner._keep_in_fp32_modules)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored["scale_shift_table"] == stored["blocks.0.attn1.norm_q.weight"] == "F32"
    assert stored["blocks.0.attn1.to_q.weight"] == "BF16"
    assert net.scale_shift_table.dtype == net.blocks[0].attn1.norm_q.weight.dtype == torch.float32
    assert (
        "lightning"
        not in subprocess.run(  # loading an export needs none of the training stack
            [
                sys.executable,
                "-c",
                "import sys; from surf_train.models.loading import load_refiner; "
                f"load_refiner({str(tmp_path / 'bf')!r}); "
                "print([m for m in ('lightning', 'deepspeed', 'hydra', 'wandb') if m in sys.modules])",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split("[")[1]
    )


def test_clear_errors(plain_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint not found"):
        export(tmp_path / "nope.ckpt", tmp_path / "o")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {}}, foreign)
    with pytest.raises(ConfigError, match="not a surf_train Refiner checkpoint"):
        export(foreign, tmp_path / "o")
    with pytest.raises(ConfigError, match="not an exported Refiner"):
        load_refiner(tmp_path)
    out = export(plain_ckpt, tmp_path / "exp")
    config = json.loads((out / "config.json").read_text())
    config["dim"] = 48
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"do not match the Refiner config .*weights \(32"):
        load_refiner(out)
    r = subprocess.run(
        [sys.executable, "-m", "surf_train.export", str(foreign), str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_zero2_checkpoint_exports_deepspeeds_fp32_weights(pairs, tmp_path):
    """A 2-rank ZeRO-2 run; the export equals DeepSpeed's own fp32 reconstruction of the checkpoint."""
    args = [
        "trainer=deepspeed",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=2",
        f"data.shards={pairs}",
        f"run_dir={tmp_path}",
        "ckpt_every=2",
        "trainer.max_steps=4",
        "data.val_samples=0",
        "data.batch_size=2",
        "logger=none",
        "module.decode_base=null",
        "module.ema_decay=0.5",
        "trainer.enable_progress_bar=false",
        *SHRINK,
    ]
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "surf_train",
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = p.communicate(timeout=400)
    finally:
        kill_tree(p)
    assert p.returncode == 0, out[-3000:]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()
    exp = export(ckpt, tmp_path / "exp", weights="raw")
    net, meta = load_refiner(exp)
    assert meta["step"] == 4
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ref = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="checkpoint")  # DeepSpeed's converter
    for k, v in net.state_dict().items():
        assert torch.equal(v, ref[f"net.{k}"]), k
    state, _, _ = read_checkpoint(ckpt)
    ema, _ = load_refiner(export(ckpt, tmp_path / "ema", weights="ema"))
    assert all(torch.equal(v, state[f"ema.module.{k}"]) for k, v in ema.state_dict().items())


def test_export_is_a_diffusers_model_directory_with_a_card(plain_ckpt, tmp_path):
    from surf_train.models.refiner import Refiner

    out = export(plain_ckpt, tmp_path / "repo" / "refiner")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "surf.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "Refiner" and config["dim"] == 32 and "trained_on" not in config
    meta = json.loads((out / "surf.json").read_text())
    assert meta["format"] == "surf-refiner" and meta["version"] == 2 and meta["step"] == 3
    assert meta["trained_on"]["base"]["name"] == "tiny" and "steps" in meta["bridge"]
    assert meta["source"] == plain_ckpt.name  # the file name, not the training machine's path
    # from_pretrained (subfolder, as in a hub repository holding several components) is the checkpoint's module
    net = Refiner.from_pretrained(tmp_path / "repo", subfolder="refiner")
    same, meta2 = load_refiner(tmp_path / "repo", subfolder="refiner")
    ema = RefinerModule.load_from_checkpoint(plain_ckpt, weights_only=True).ema.module.eval()
    args = inputs(net)
    with torch.no_grad():
        assert torch.equal(net(*args).sample, ema(*args).sample) and torch.equal(same(*args).sample, ema(*args).sample)
    assert meta2["refiner"]["dim"] == 32 and meta2["trained_on"] == meta["trained_on"]
    card = (out / "README.md").read_text()
    summary = json.loads((plain_ckpt.parents[1] / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: diffusers\n") and "| base model | tiny (" in card
    assert "| steps | 3 (ema weights" in card and f"{summary['train_loss_last']:.4g}" in card
    assert "summary.json at step 3" in card and "preview latent [3, 4, 4] -> target latent [3, 8, 8]" in card


def _write_v1(net, out: Path, **meta):
    """An export as the first format wrote it: refiner.safetensors + config.json with everything."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        str(out / "refiner.safetensors"),
        metadata={"format": "surf-refiner"},
    )
    (out / "config.json").write_text(
        json.dumps(
            {
                "format": "surf-refiner",
                "version": 1,
                "refiner": net.cfg.to_dict(),
                "bridge": {"steps": 3},
                "dtype": "float32",
                **meta,
            }
        )
    )


def test_first_format_still_loads_and_converts(plain_ckpt, tmp_path):
    net, meta = load_refiner(export(plain_ckpt, tmp_path / "new"))
    _write_v1(net, tmp_path / "old", step=3, weights="ema", trained_on=meta["trained_on"])
    old, old_meta = load_refiner(tmp_path / "old")
    args = inputs(net)
    with torch.no_grad():
        assert torch.equal(old(*args).sample, net(*args).sample)
    assert old_meta["version"] == 1 and old_meta["refiner"] == meta["refiner"]
    from surf_train.models.refiner import Refiner

    with pytest.raises(ConfigError, match="first SURF format.*--convert"):
        Refiner.from_pretrained(tmp_path, subfolder="old")
    half, _ = load_refiner(tmp_path / "old", dtype=torch.bfloat16)  # the float32 modules stay float32
    assert half.proj_out.weight.dtype == torch.bfloat16 and half.scale_shift_table.dtype == torch.float32
    r = subprocess.run(
        [sys.executable, "-m", "surf_train.export", "--convert", str(tmp_path / "old"), str(tmp_path / "conv")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "exported ema weights of step 3" in r.stdout, r.stderr
    conv, conv_meta = load_refiner(tmp_path / "conv")
    assert (tmp_path / "conv" / "diffusion_pytorch_model.safetensors").is_file()
    assert conv_meta["trained_on"] == meta["trained_on"] and conv_meta["bridge"] == {"steps": 3}
    with torch.no_grad():
        assert torch.equal(conv(*args).sample, net(*args).sample)
    assert export(plain_ckpt, tmp_path / "old").joinpath("surf.json").is_file()  # a v1 export is replaced too
    assert not (tmp_path / "old" / "refiner.safetensors").exists()


def test_export_and_checkpoint_reading_do_not_import_the_training_module():
    """export.py <-> module.py was an import circle: checkpoint reading lives in checkpoint.py now."""
    import ast

    for name in ("training/export", "training/checkpoint", "models/loading", "models/refiner"):
        tree = ast.parse((ROOT / "surf_train" / f"{name}.py").read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }
        assert not mods & {"surf_train.training.module", "surf_train.training.train"}, name


def test_sharded_export_loads(tmp_path):
    from surf_train.models.loading import is_export
    from surf_train.models.refiner import Refiner, RefinerConfig
    from surf_train.training.export import save_refiner

    torch.manual_seed(0)
    net = Refiner.from_cfg(RefinerConfig(dim=32, depth=2, heads=2))
    torch.nn.init.normal_(net.proj_out.weight, std=0.02)
    out = save_refiner(net.state_dict(), net.cfg, tmp_path / "one", bridge={"steps": 2})
    net.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # as diffusers writes a large model
    (tmp_path / "sharded" / "surf.json").write_text((out / "surf.json").read_text())
    assert len(list((tmp_path / "sharded").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert is_export(tmp_path / "sharded")
    back, meta = load_refiner(tmp_path / "sharded")
    args = inputs(net)
    with torch.no_grad():
        assert torch.equal(back(*args).sample, net.eval()(*args).sample) and meta["bridge"] == {"steps": 2}


def test_exported_files_are_readable_like_config_json(tmp_path):
    """The weights are as readable as config.json (0644 under umask 022), not safetensors' 0600: colleagues on a
    shared cluster load the same export."""
    from surf_train.models.refiner import Refiner, RefinerConfig
    from surf_train.training.export import save_refiner

    net = Refiner.from_cfg(RefinerConfig(dim=32, depth=2, heads=2))
    old = os.umask(0o022)
    try:
        out = save_refiner(net.state_dict(), net.cfg, tmp_path / "e", bridge={"steps": 2})
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["diffusion_pytorch_model.safetensors"] == modes["config.json"] == 0o644, modes
