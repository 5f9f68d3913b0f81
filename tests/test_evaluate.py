"""The signature-fidelity evaluation: metrics on constructed cases, bootstrap intervals, and a small run."""

import json

import numpy as np
import pytest
import torch

from surf_train import CONF_DIR
from surf_train.errors import ConfigError
from surf_train.evaluate import MISSING, PSNR_CAP, EvalConfig, _clip_metrics, bootstrap_ci, evaluate, main
from surf_train.toyworld import detect, render

CAP = "a yellow pillar moving down on a black background"
ASSET = CONF_DIR.parent / "assets" / "toy_base"


def test_identical_clips_are_perfect():
    v = render(CAP, 5, (32, 32), 5)
    m = _clip_metrics(v, v, detect(v), CAP, (16, 16))
    assert m["psnr"] == m["psnr_lo"] == PSNR_CAP and m["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["pos_err"] == 0 and m["speed_err"] == 0
    assert m["colour"] == m["shape"] == m["direction"] == m["background"] == m["all3"] == 1.0


def test_shifted_object_gives_its_shift_as_position_error():
    ref = render(CAP, 5, (32, 32), 5)
    moved = torch.roll(ref, shifts=(2, 1), dims=(-1, -2))  # 2 px right, 1 px down (seed 5: stays inside the frame)
    m = _clip_metrics(moved, ref, detect(ref), CAP, (16, 16))
    assert m["pos_err"] == pytest.approx(np.hypot(2 / 32, 1 / 32), abs=1e-3)
    assert m["psnr"] < m["psnr_lo"] < 40  # pooling blurs the shift a little but does not hide it
    assert m["psnr"] < 30 and m["ssim"] < 0.99 and m["speed_err"] < 1e-6 and m["all3"] == 1.0


def test_low_resolution_clip_is_compared_to_the_downsampled_reference():
    ref, low = render(CAP, 5, (32, 32), 5), render(CAP, 5, (16, 16), 5)
    m = _clip_metrics(low, ref, detect(ref), CAP, (16, 16))
    assert m["psnr"] > 60 and m["psnr_lo"] > 60  # the 16x16 render is the area-downsampled 32x32 one
    up = torch.nn.functional.interpolate(low, size=(32, 32), mode="nearest")
    m_up = _clip_metrics(up, ref, detect(ref), CAP, (16, 16))
    assert m_up["psnr_lo"] > 60 > m_up["psnr"]  # same content on the preview grid, blockier at 32x32
    assert m["pos_err"] < 0.01 and m["all3"] == 1.0


def test_wrong_content_and_missing_object():
    ref = render(CAP, 5, (32, 32), 5)
    other = render("a red bar moving right on a white background", 5, (32, 32), 5)
    m = _clip_metrics(other, ref, detect(ref), CAP)
    assert m["colour"] == m["shape"] == m["direction"] == m["background"] == m["all3"] == 0.0
    empty = torch.full_like(ref, -0.9)  # black, no object
    m = _clip_metrics(empty, ref, detect(ref), CAP)
    assert m["pos_err"] == MISSING and m["colour"] == 0.0 and m["background"] == 1.0


def test_bootstrap_interval():
    rng = np.random.default_rng(0)
    shifted = rng.normal(0.3, 0.2, 64)
    lo, hi = bootstrap_ci(shifted, 2000)
    assert 0 < lo < 0.3 < hi
    centred = shifted - shifted.mean()
    lo, hi = bootstrap_ci(centred, 2000)
    assert lo < 0 < hi


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="unknown re-noise rule"):
        EvalConfig(rules=["nope"]).check()
    with pytest.raises(ConfigError, match="switch 20 must be in"):
        EvalConfig(switches=[20]).check()
    with pytest.raises(ConfigError, match="no exported Refiner"):
        evaluate(EvalConfig(refiner="/nonexistent", n=2))


@pytest.mark.skipif(not (ASSET / "model_index.json").is_file(), reason="assets/toy_base missing")
def test_small_run_writes_table_plot_and_consistent_numbers(tmp_path, monkeypatch, capsys):
    """An untrained (zero-output) Refiner returns the upsampled preview, so `surf` must equal `upsampled`."""
    from surf_train.export import save_refiner
    from surf_train.refiner import Refiner, RefinerConfig

    monkeypatch.chdir(CONF_DIR.parent)
    cfg = RefinerConfig(in_channels=12, dim=32, depth=2, heads=2, text_dim=64, window=(1, 4, 4))
    torch.manual_seed(0)
    save_refiner(Refiner.from_cfg(cfg).state_dict(), cfg, tmp_path / "refiner", bridge={"steps": 2})
    out = tmp_path / "eval"
    main(
        [
            "--n",
            "4",
            "--batch",
            "2",
            "--switches",
            "3",
            "--steps",
            "6",
            "--surf-switch",
            "3",
            "--refiner",
            str(tmp_path / "refiner"),
            "--out-dir",
            str(out),
            "--no-progress",
            "--bootstrap",
            "200",
        ]
    )
    res = json.loads((out / "results.json").read_text())
    meth = res["methods"]
    assert set(meth) == {"reference", "direct", "paper@3", "snr@3", "pool@3", "upsampled", "surf"}
    assert meth["reference"]["pos_err"] == 0 and meth["reference"]["psnr"] == PSNR_CAP
    for k in ("psnr", "ssim", "pos_err", "all3"):
        assert meth["surf"][k] == pytest.approx(meth["upsampled"][k], abs=1e-6)
    # cost: previews are cheaper than the reference; the later the switch, the closer to it
    assert meth["direct"]["gflops"] < meth["pool@3"]["gflops"] < meth["reference"]["gflops"]
    assert meth["surf"]["gflops"] > meth["upsampled"]["gflops"] == meth["pool@3"]["gflops"]
    assert all(len(v) == 4 for v in res["per_clip"].values())
    assert {(d["a"], d["b"], d["metric"]) for d in res["paired"]} >= {
        ("surf", "upsampled", "psnr"),
        ("pool@3", "direct", "pos_err"),
        ("pool@3", "snr@3", "pos_err"),
    }
    assert (out / "fidelity_vs_cost.png").stat().st_size > 10_000
    assert "| surf |" in (out / "table.md").read_text() and "| surf |" in capsys.readouterr().out
