"""The signature-fidelity evaluation: metrics on constructed cases, bootstrap intervals, and a small run."""

import json

import numpy as np
import pytest
import torch

from surf_train import CONF_DIR
from surf_train.common.errors import ConfigError
from surf_train.data.toyworld import Caption, coverage, detect, motion, object_mask, render
from surf_train.evaluate import EvalConfig, evaluate, main, parse_args
from surf_train.evaluation.metrics import MISSING, PSNR_CAP, clip_metrics, masked_psnr, region_masks, sharpness
from surf_train.evaluation.report import grid_png
from surf_train.evaluation.stats import bootstrap_ci, paired_gain

CAP = "a yellow pillar moving down on a black background"
ASSET = CONF_DIR.parent / "assets" / "toy_base"


def test_identical_clips_are_perfect():
    v = render(CAP, 5, (32, 32), 5)
    m = clip_metrics(v, v, detect(v), CAP, (16, 16))
    assert m["psnr"] == m["psnr_lo"] == PSNR_CAP and m["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["pos_err"] == 0 and m["speed_err"] == 0
    assert m["colour"] == m["shape"] == m["direction"] == m["background"] == m["all3"] == 1.0
    assert m["sharpness"] == pytest.approx(1.0)


def test_sharpness_sees_blur():
    ref = render(CAP, 5, (32, 32), 5)
    assert sharpness(ref, ref) == pytest.approx(1.0)
    pooled = torch.nn.functional.avg_pool3d(ref[None], (1, 2, 2))[0]  # the 16x16 clip, upsampled back
    for mode in ("bilinear", "bicubic"):
        up = torch.nn.functional.interpolate(pooled, size=(32, 32), mode=mode)
        assert sharpness(up, ref) < 0.7, mode
    blurred = torch.nn.functional.avg_pool3d(ref[None], (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    assert sharpness(blurred[0], ref) < 0.5
    # blocks are high frequency too: the measure flags them above 1 (why the criterion is a band around 1)
    assert sharpness(torch.nn.functional.interpolate(pooled, size=(32, 32), mode="nearest"), ref) > 1.0


def test_gain_of_a_method_over_itself_is_zero():
    a = np.random.default_rng(0).normal(25, 2, 16)
    assert paired_gain(a, a, 200) == dict(mean=0.0, ci95=[0.0, 0.0], separated=False, clips=16)
    b = a.copy()
    b[3] = np.nan  # an empty region in one clip: left out, not NaN
    assert paired_gain(a + 1, b, 200)["mean"] == pytest.approx(1.0) and paired_gain(a + 1, b, 200)["clips"] == 15
    assert paired_gain(a, np.full(16, np.nan), 200)["mean"] is None


@pytest.mark.parametrize("seed", [5, 11])
def test_object_and_background_masks_partition_the_frame_and_cover_the_object(seed):
    others = ("a red circle moving right on a gray background", "a blue bar moving down on a white background")
    for cap_text in (CAP, *others):
        ref = render(cap_text, seed, (32, 32), 5)
        det = detect(ref)
        obj, bg = region_masks(ref, det, dilate=2)
        assert obj.shape == bg.shape == (5, 32, 32) and obj.dtype == bool
        assert not (obj & bg).any() and (obj | bg).all()
        cap, mo = Caption.parse(cap_text), motion(Caption.parse(cap_text), seed)
        for f, (cx, cy) in enumerate(mo.centres(cap, 5)):
            cov = coverage(cap.shape, (cx * 32, cy * 32), mo.radius * 32, 32, 32)  # the renderer's own coverage
            assert obj[f][cov > 0].all()  # the whole object and its partly covered edge pixels
            assert obj[f].sum() < 4 * (cov > 0).sum()  # grown by 2 px, not the whole frame
        assert masked_psnr(ref, ref, obj) == masked_psnr(ref, ref, bg) == PSNR_CAP
        assert masked_psnr(ref, ref, np.zeros_like(obj)) is None
    empty = torch.full_like(ref, -0.9)  # no object: everything is background
    obj, bg = region_masks(empty, detect(empty), dilate=2)
    assert not obj.any() and bg.all()


def test_grid_png_has_the_expected_size(tmp_path):
    from PIL import Image

    clips = torch.stack([render(CAP, s, (32, 32), 5) for s in range(6)])  # (6, 3, 5, 32, 32)
    cols = {"reference": clips, "upsampled": clips.flip(-1), "SURF": clips}
    size = grid_png(cols, tmp_path / "grid.png", scale=4, gap=6, frame_gap=2, header=14)
    panel = 5 * 32 * 4 + 4 * 2
    assert size == (3 * panel + 4 * 6, 14 + 6 * 32 * 4 + 7 * 6)
    img = Image.open(tmp_path / "grid.png")
    assert img.size == size
    px = np.asarray(img.convert("RGB"))
    frame = ((clips[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()  # first frame, 32x32
    assert (px[14 + 6 : 14 + 6 + 128 : 4, 6 : 6 + 128 : 4] == frame).all()  # nearest-neighbour enlarged, in place


def test_shifted_object_gives_its_shift_as_position_error():
    ref = render(CAP, 5, (32, 32), 5)
    moved = torch.roll(ref, shifts=(2, 1), dims=(-1, -2))  # 2 px right, 1 px down (seed 5: stays inside the frame)
    m = clip_metrics(moved, ref, detect(ref), CAP, (16, 16))
    assert m["pos_err"] == pytest.approx(np.hypot(2 / 32, 1 / 32), abs=1e-3)
    assert m["psnr"] < m["psnr_lo"] < 40  # pooling blurs the shift a little but does not hide it
    assert m["psnr"] < 30 and m["ssim"] < 0.99 and m["speed_err"] < 1e-6 and m["all3"] == 1.0


def test_low_resolution_clip_is_compared_to_the_downsampled_reference():
    ref, low = render(CAP, 5, (32, 32), 5), render(CAP, 5, (16, 16), 5)
    m = clip_metrics(low, ref, detect(ref), CAP, (16, 16))
    assert m["psnr"] > 60 and m["psnr_lo"] > 60  # the 16x16 render is the area-downsampled 32x32 one
    up = torch.nn.functional.interpolate(low, size=(32, 32), mode="nearest")
    m_up = clip_metrics(up, ref, detect(ref), CAP, (16, 16))
    assert m_up["psnr_lo"] > 60 > m_up["psnr"]  # same content on the preview grid, blockier at 32x32
    assert m["pos_err"] < 0.01 and m["all3"] == 1.0


def test_wrong_content_and_missing_object():
    ref = render(CAP, 5, (32, 32), 5)
    other = render("a red bar moving right on a white background", 5, (32, 32), 5)
    m = clip_metrics(other, ref, detect(ref), CAP)
    assert m["colour"] == m["shape"] == m["direction"] == m["background"] == m["all3"] == 0.0
    empty = torch.full_like(ref, -0.9)  # black, no object
    m = clip_metrics(empty, ref, detect(ref), CAP)
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


def _tiny_refiner(path, up_mode="bilinear"):
    """An untrained Refiner: its output layer starts at zero, so it returns the upsampled input."""
    from surf_train.models.refiner import Refiner, RefinerConfig
    from surf_train.training.export import save_refiner

    cfg = RefinerConfig(in_channels=12, dim=32, depth=2, heads=2, text_dim=64, window=(1, 4, 4))
    torch.manual_seed(0)
    save_refiner(Refiner.from_cfg(cfg).state_dict(), cfg, path, bridge={"steps": 2, "up_mode": up_mode})
    return path


needs_toy_base = pytest.mark.skipif(not (ASSET / "model_index.json").is_file(), reason="assets/toy_base missing")


@needs_toy_base
def test_small_run_writes_table_plot_and_consistent_numbers(tmp_path, monkeypatch, capsys):
    """An untrained (zero-output) Refiner returns the upsampled preview, so `surf` must equal `upsampled`."""
    monkeypatch.chdir(CONF_DIR.parent)
    _tiny_refiner(tmp_path / "refiner")
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
    for k in ("psnr", "ssim", "pos_err", "all3", "sharpness"):
        assert meth["surf"][k] == pytest.approx(meth["upsampled"][k], abs=1e-6)
    assert meth["reference"]["sharpness"] == 1.0 and meth["upsampled"]["sharpness"] < 1.0
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
    from PIL import Image

    assert Image.open(out / "grid.png").size == (3 * (5 * 128 + 8) + 24, 14 + 4 * 128 + 5 * 6)  # 4 clips: n < 6
    assert "| surf |" in (out / "table.md").read_text() and "| surf |" in capsys.readouterr().out


@needs_toy_base
def test_sr_mode_writes_every_field(tmp_path, monkeypatch, capsys):
    """Super-resolution mode with the untrained Refiner: every K equals bilinear exactly (gain 0)."""
    from PIL import Image

    monkeypatch.chdir(CONF_DIR.parent)
    ref = _tiny_refiner(tmp_path / "refiner")
    out = tmp_path / "sr"
    args = ["--mode", "sr", "--n", "3", "--batch", "2", "--steps", "4", "--ks", "1", "3"]
    main([*args, "--refiner", str(ref), "--out-dir", str(out), "--no-progress", "--bootstrap", "100"])
    res = json.loads((out / "results_sr.json").read_text())
    assert set(res) == {"mode", "config", "n", "prompts", "methods", "paired", "k_table", "iou_by_shape", "per_clip"}
    assert res["mode"] == "sr" and res["n"] == 3 and res["config"]["ks"] == [1, 3]
    meth = res["methods"]
    assert list(meth) == ["bilinear", "bicubic", "refiner@1", "refiner@3"]
    fields = {"psnr", "psnr_obj", "psnr_bg", "psnr_lo", "ssim", "sharpness", "sharpness_ci95", "pos_err", "all3"}
    fields |= {"obj_iou"}
    fields |= {"colour", "shape", "direction", "background", "speed_err", "seconds", "gflops", "obj_frac"}
    for m, v in meth.items():
        assert set(v) == fields, m
        assert 0 < v["obj_frac"] < 0.6 and v["psnr_obj"] < v["psnr_bg"]  # the flat background is the easy part
        assert v["sharpness_ci95"][0] <= v["sharpness"] <= v["sharpness_ci95"][1]
    for k in ("psnr", "psnr_obj", "psnr_bg", "ssim", "sharpness", "obj_iou"):
        assert meth["refiner@3"][k] == pytest.approx(meth["bilinear"][k], abs=1e-4)
    assert meth["bilinear"]["sharpness"] < 0.6 and meth["bilinear"]["gflops"] == 0
    g1, g3 = meth["refiner@1"]["gflops"], meth["refiner@3"]["gflops"]
    assert 0 < g1 < g3 == pytest.approx(3 * g1, rel=0.01)  # K forward passes (rounded to 4 digits)
    gains = {(d["a"], d["metric"]): d for d in res["paired"]}
    assert {d["b"] for d in res["paired"]} == {"bilinear"}
    for m in ("bicubic", "refiner@1", "refiner@3"):
        for k in ("psnr", "psnr_obj", "psnr_bg", "ssim", "sharpness"):
            assert set(gains[m, k]) == {"a", "b", "metric", "mean", "ci95", "separated", "clips"}
    zero = gains["refiner@1", "psnr"]
    assert zero["mean"] == pytest.approx(0, abs=1e-4) and not zero["separated"] and zero["clips"] == 3
    assert [r["k"] for r in res["k_table"]] == [1, 3]
    for m, by in res["iou_by_shape"].items():  # per shape: the mean of the clips of that shape
        for shape, v in by.items():
            rows = [r["obj_iou"] for r, p in zip(res["per_clip"][m], res["prompts"]) if Caption.parse(p).shape == shape]
            assert v == pytest.approx(np.mean(rows), abs=1e-4) and 0 <= v <= 1
    k_fields = {"k", "psnr", "psnr_obj", "psnr_bg", "ssim", "sharpness", "obj_iou", "gflops", "ms"}
    assert set(res["k_table"][0]) == k_fields
    assert all(len(v) == 3 for v in res["per_clip"].values())
    assert Image.open(out / "grid_sr.png").size == (3 * (5 * 128 + 8) + 24, 14 + 3 * 128 + 4 * 6)
    table = (out / "table_sr.md").read_text()
    assert "| refiner@3 |" in table and "| K |" in table and "| refiner@3 |" in capsys.readouterr().out


@needs_toy_base
def test_sr_start_noise_overrides_the_export(tmp_path, monkeypatch):
    """--start-noise and --consistency: the zero-output Refiner keeps its start point, so with noise it falls below
    bilinear (by the noise it leaves) and at 0 it equals bilinear; the --compare Refiner keeps its start noise."""
    monkeypatch.chdir(CONF_DIR.parent)
    ref = _tiny_refiner(tmp_path / "refiner")
    args = ["--mode", "sr", "--n", "2", "--batch", "2", "--steps", "4", "--ks", "1", "--bootstrap", "100"]
    args += ["--no-progress", "--grid-clips", "0", "--refiner", str(ref), "--compare", str(ref)]
    res = {}
    for s, extra in (("0", []), ("0.3", []), ("on", ["--start-noise", "0", "--consistency", "on"])):
        flags = ["--start-noise", s] if not extra else extra
        evaluate(parse_args([*args, *flags, "--out-dir", str(tmp_path / s)]))
        res[s] = json.loads((tmp_path / s / "results_sr.json").read_text())["methods"]
    assert res["0"]["refiner@1"]["psnr"] == pytest.approx(res["0"]["bilinear"]["psnr"], abs=1e-4)
    assert res["0.3"]["refiner@1"]["psnr"] < res["0.3"]["bilinear"]["psnr"] - 3
    assert res["0.3"]["refiner@1"]["sharpness"] > 2 * res["0.3"]["bilinear"]["sharpness"]  # leftover noise
    assert res["0.3"]["compare@2"]["psnr"] == pytest.approx(res["0.3"]["bilinear"]["psnr"], abs=1e-4)
    # --consistency on (every Refiner): the bilinear start gets the preview's low band exactly, which moves it; the
    # zero-output Refiners are then exactly the new `bilinear+consistency` row, the share that needs no network
    on = res["on"]
    assert list(on)[:3] == ["bilinear", "bicubic", "bilinear+consistency"]
    assert abs(on["refiner@1"]["psnr"] - on["bilinear"]["psnr"]) > 0.05
    for m in ("refiner@1", "compare@2"):
        assert on[m]["psnr"] == pytest.approx(on["bilinear+consistency"]["psnr"], abs=1e-4)
    assert "bilinear+consistency" not in res["0"]
    with pytest.raises(ConfigError, match="--start-noise -1"):
        parse_args(["--start-noise", "-1"]).check()


@needs_toy_base
def test_sr_compare_runs_a_second_refiner_at_its_own_k(tmp_path, monkeypatch):
    """--compare: the second Refiner (here the same one, perturbed so it moves the output) at its stored K = 2
    gives exactly the main Refiner's numbers at K = 2, and shows in the gains and the grid."""
    from PIL import Image

    from surf_train.models.loading import load_refiner
    from surf_train.training.export import save_refiner

    monkeypatch.chdir(CONF_DIR.parent)
    net, _ = load_refiner(_tiny_refiner(tmp_path / "zero"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_refiner(net.state_dict(), net.cfg, tmp_path / "moved", bridge={"steps": 2})
    out = tmp_path / "sr"
    args = ["--mode", "sr", "--n", "2", "--batch", "2", "--steps", "4", "--ks", "1", "2", "--bootstrap", "100"]
    args.append("--no-progress")
    main([*args, "--refiner", str(tmp_path / "moved"), "--compare", str(tmp_path / "moved"), "--out-dir", str(out)])
    res = json.loads((out / "results_sr.json").read_text())
    meth = res["methods"]
    assert list(meth) == ["bilinear", "bicubic", "refiner@1", "refiner@2", "compare@2"]
    for k in ("psnr", "psnr_bg", "ssim", "sharpness", "gflops"):
        assert meth["compare@2"][k] == meth["refiner@2"][k]
    assert meth["compare@2"]["psnr"] != meth["bilinear"]["psnr"]  # the perturbed Refiner does change the output
    assert ("compare@2", "psnr") in {(d["a"], d["metric"]) for d in res["paired"]}
    assert Image.open(out / "grid_sr.png").size[0] == 4 * (5 * 128 + 8) + 5 * 6  # reference | bilinear | both Refiners
    assert "compare: `" in (out / "table_sr.md").read_text()


def test_object_iou_is_exact_for_a_shifted_mask_and_drops_when_a_pillar_breaks_up():
    ref = render(CAP, 5, (32, 32), 5)  # a yellow pillar on black
    det = detect(ref)
    assert clip_metrics(ref, ref, det, CAP)["obj_iou"] == 1.0
    mask = object_mask(ref, det)
    moved = torch.roll(ref, shifts=2, dims=-1)  # 2 px right (seed 5: stays inside the frame)
    shifted = np.roll(mask, 2, axis=-1)
    want = (mask & shifted).sum() / (mask | shifted).sum()  # ground truth from the masks themselves
    assert clip_metrics(moved, ref, det, CAP)["obj_iou"] == pytest.approx(want) and 0.2 < want < 0.9
    broken = ref.clone()
    broken[:, :, 12:18] = -0.9  # a black band across the frame: the pillar breaks into two pieces
    assert clip_metrics(broken, ref, det, CAP)["obj_iou"] < 1.0
    assert clip_metrics(torch.full_like(ref, -0.9), ref, det, CAP)["obj_iou"] == 0.0  # no object at all


@needs_toy_base
def test_upsampled_is_bilinear_whatever_the_refiners_upsampling(tmp_path, monkeypatch):
    """`upsampled` is one baseline for every Refiner: a zero-output Refiner with nearest upsampling returns its
    blocky input as `surf`, while `upsampled` stays the bilinear preview (a weaker baseline would flatter it)."""
    monkeypatch.chdir(CONF_DIR.parent)
    args = ["--n", "2", "--batch", "2", "--switches", "3", "--steps", "6", "--surf-switch", "3", "--rules", "pool"]
    args += ["--no-progress", "--bootstrap", "50", "--grid-clips", "0"]
    meth = {}
    for mode in ("bilinear", "nearest"):
        main([*args, "--refiner", str(_tiny_refiner(tmp_path / mode, mode)), "--out-dir", str(tmp_path / f"e_{mode}")])
        meth[mode] = json.loads((tmp_path / f"e_{mode}" / "results.json").read_text())["methods"]
    assert meth["nearest"]["upsampled"]["psnr"] == pytest.approx(meth["bilinear"]["upsampled"]["psnr"], abs=1e-6)
    assert meth["bilinear"]["surf"]["psnr"] == pytest.approx(meth["bilinear"]["upsampled"]["psnr"], abs=1e-6)
    assert meth["nearest"]["surf"]["sharpness"] > meth["nearest"]["upsampled"]["sharpness"] + 0.05  # block edges
