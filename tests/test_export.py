import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surf_train.errors import ConfigError
from surf_train.export import export, load_refiner, read_checkpoint
from surf_train.module import RefinerModule
from surf_train.train import train
from procs import free_port, kill_tree
from test_train import FAST, SHRINK, compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def inputs(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 8, 8, generator=g)
    return x, torch.rand(2, generator=g), torch.randn(2, 16, 3, 8, 8, generator=g), \
        torch.randn(2, 16, net.cfg.text_dim, generator=g)


@pytest.fixture(scope="module")
def plain_ckpt(pairs, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(compose_cfg([f"data.shards={pairs}", f"run_dir={run}", "trainer.max_steps=3", "ckpt_every=3",
                       "data.val_samples=0", "module.ema_decay=0.5", *SHRINK, *FAST]))
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_exported_refiner_matches_the_checkpoint(plain_ckpt, tmp_path, weights):
    out = export(plain_ckpt, tmp_path / "exp", weights=weights)
    net, meta = load_refiner(out)
    assert meta["weights"] == weights and meta["step"] == 3 and meta["refiner"]["dim"] == 32
    module = RefinerModule.load_from_checkpoint(plain_ckpt, weights_only=True)
    ref = (module.ema.module if weights == "ema" else module.net).eval()
    args = inputs(net)
    assert torch.equal(net(*args), ref(*args))
    other = module.net if weights == "ema" else module.ema.module
    assert not torch.allclose(net(*args), other.eval()(*args))  # raw and EMA really differ


def test_export_dtype_and_cli(plain_ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "surf_train.export", str(plain_ckpt), str(tmp_path / "bf"),
                        "--dtype", "bfloat16"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "exported ema weights of step 3 (bfloat16)" in r.stdout
    net, _ = load_refiner(tmp_path / "bf")
    assert next(net.parameters()).dtype == torch.bfloat16
    assert "lightning" not in subprocess.run(  # loading an export needs none of the training stack
        [sys.executable, "-c", f"import sys; from surf_train.export import load_refiner; load_refiner({str(tmp_path / 'bf')!r}); "
                               "print([m for m in ('lightning', 'deepspeed', 'hydra', 'wandb') if m in sys.modules])"],
        cwd=ROOT, capture_output=True, text=True).stdout.split("[")[1]


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
    meta = json.loads((out / "config.json").read_text())
    meta["refiner"]["dim"] = 48
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"do not match the Refiner config .*weights \(32"):
        load_refiner(out)
    r = subprocess.run([sys.executable, "-m", "surf_train.export", str(foreign), str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_zero2_checkpoint_exports_deepspeeds_fp32_weights(pairs, tmp_path):
    """A 2-rank ZeRO-2 run; the export equals DeepSpeed's own fp32 reconstruction of the checkpoint."""
    args = ["trainer=deepspeed", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2",
            f"data.shards={pairs}", f"run_dir={tmp_path}", "ckpt_every=2", "trainer.max_steps=4",
            "data.val_samples=0", "data.batch_size=2", "logger=none", "module.decode_base=null",
            "module.ema_decay=0.5", "trainer.enable_progress_bar=false", *SHRINK]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "surf_train", *args], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
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
