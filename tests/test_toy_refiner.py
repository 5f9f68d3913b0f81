"""The shipped toy-world Refiner (assets/toy_refiner, `make toy-refiner`) refines: super-resolution of 8 held-out
native toy-base clips (evaluate --mode sr; the Refiner was trained on seeds 100000+, these are seeds 0-7)."""

import json

import pytest

from surf_train import CONF_DIR, TOY_REFINER
from surf_train.evaluate import main

pytestmark = pytest.mark.skipif(not (TOY_REFINER / "surf.json").is_file(), reason="assets/toy_refiner missing")


@pytest.mark.slow
def test_shipped_refiner_beats_bilinear_in_super_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(CONF_DIR.parent)
    out = tmp_path / "sr"
    main(["--mode", "sr", "--n", "8", "--ks", "4", "--out-dir", str(out), "--no-progress", "--bootstrap", "500"])
    res = json.loads((out / "results_sr.json").read_text())
    assert res["config"]["refiner"] == str(TOY_REFINER)  # the default Refiner of evaluate
    ref, bil = res["methods"]["refiner@4"], res["methods"]["bilinear"]
    gain = {d["metric"]: d for d in res["paired"] if d["a"] == "refiner@4"}
    assert gain["psnr"]["mean"] >= 1.5 and gain["psnr"]["ci95"][0] > 0
    assert gain["psnr_obj"]["mean"] >= 1.5
    assert ref["psnr_bg"] >= bil["psnr_bg"] - 1.0  # no window seams in the flat background
    assert ref["ssim"] >= bil["ssim"]
    # Sharper than bilinear by a clear margin, though not yet as sharp as the base model (issue 14 asks >= 0.7;
    # measured 0.52 at K = 4 on N = 64): the speckle of the native clips is not in the pooled preview.
    assert ref["sharpness"] >= bil["sharpness"] + 0.15
