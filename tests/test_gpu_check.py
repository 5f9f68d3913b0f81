"""benchmarks/gpu_check.py: the dry run (every part on CPU, the real run's schema) and the composition arithmetic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check as G  # noqa: E402

from surf_train import cost  # noqa: E402


def schema_diff(skel, doc, path=""):
    """Paths missing from doc or extra in it, where the skeleton fixes the keys (non-empty dicts); a null or
    empty-dict leaf of the skeleton (a config, a summary, null_reasons) holds free-form data."""
    if not isinstance(skel, dict) or not skel:
        return []
    if not isinstance(doc, dict):
        return [f"{path} (not a dict)"]
    out = [f"{path}.{k} missing" for k in skel if k not in doc]
    out += [f"{path}.{k} extra" for k in doc if k not in skel and k != "traceback"]
    for k in skel:
        if k in doc:
            out += schema_diff(skel[k], doc[k], f"{path}.{k}")
    return out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, json.loads((out / "dry-run-cpu.json").read_text()), p.stdout


@pytest.mark.slow
def test_dry_run_runs_every_part_with_the_real_schema(dry_run):
    out, doc, stdout = dry_run
    assert (out / "dry-run-cpu.md").is_file() and "| refiner_train | grouped | ok |" in stdout
    assert doc["dry_run"] and doc["complete"] and doc["wall_s"] < 120
    bad = {n: (p["status"], p["reason"], p.get("traceback")) for n, p in doc["parts"].items() if p["status"] != "ok"}
    assert not bad
    # same fields as a run at the real shapes; every null explained
    assert schema_diff(G.skeleton(G.Plan(dry_run=False)), doc) == []
    assert G.unexplained_nulls(doc) == []
    for part in ("refiner_train", "refiner_sample", "wan14b", "ti2v5b"):
        for name, c in doc["parts"][part]["results"]["cases"].items():
            assert c["status"] == "ok" and c["repeats"] >= 1 and c["ms"] > 0 and c["timer"] == "perf_counter", name
            assert c["tflops_per_s"] == pytest.approx(c["tflop"] / (c["ms"] / 1e3))
            assert c["peak_mem_gib"] is None and "CUDA-only" in c["null_reasons"]["peak_mem_gib"]


@pytest.mark.slow
def test_dry_run_times_the_compiled_twins_against_eager(dry_run):
    """Regional compilation (fullgraph) of the tiny Refiner and Wan on CPU: each compiled target case is timed
    after a first call that compiles, and its output equals the eager case's within bf16 rounding."""
    doc, stdout = dry_run[1], dry_run[2]
    assert doc["compile"] == {"enabled": True, "call": "compile_repeated_blocks(fullgraph=True)"}
    for part in ("refiner_sample", "wan14b"):
        r = doc["parts"][part]["results"]
        c, eager = r["compiled"]["target"], r["cases"]["target"]
        assert c["status"] == "ok" and c["repeats"] >= 1 and c["warmup"] == 1 and c["ms"] > 0, part
        assert c["latent"] == eager["latent"] and c["eager_ms"] == eager["ms"]
        assert c["speedup"] == pytest.approx(eager["ms"] / c["ms"]) and c["tflop"] == pytest.approx(eager["tflop"])
        assert c["compile_s"] * 1e3 > c["ms"]  # the first call traces and compiles
        assert c["out_abs_max"] > 0.1 and c["rel_diff"] == pytest.approx(c["max_abs_diff"] / c["out_abs_max"])
        assert c["rel_diff"] < 2**-5, part  # bf16 (8 significant bits): a few ulps of the largest output
    assert doc["parts"]["refiner_sample"]["results"]["compiled"]["target"]["per_step_ms"] == pytest.approx(
        doc["parts"]["refiner_sample"]["results"]["compiled"]["target"]["ms"] / 3
    )
    assert doc["parts"]["wan14b"]["results"]["compiled"]["target"]["output_finite"] is True
    assert "| wan14b | target 128x64 | ok |" in stdout.split("Regional compilation")[1]


@pytest.mark.slow
def test_dry_run_sdpa_table(dry_run):
    """Every traced attention call was tried on each backend; only the mask form's shifted windows carry a mask."""
    env = dry_run[1]["parts"]["environment"]["results"]
    assert env["project_modules"]["surf_train.training.train"]["ok"] and env["packages"]["deepspeed"]["version"]
    rows = env["sdpa"]
    assert {(r["model"], r["form"]) for r in rows} == {("refiner", "grouped"), ("refiner", "mask"), ("wan", None)}
    for r in rows:
        assert set(G.SDPA_ITEM) <= set(r) and set(r["backends"]) == set(G.BACKENDS)
        assert r["backends"][r["default_backend"]]["ok"] and r["backends"]["MATH"]["ok"]
        failed = [b for b in r["backends"].values() if not b["ok"]]
        assert all(b["error"] for b in failed)
    windows = [r for r in rows if r["call"] == "self (windows)"]
    assert not any(r["mask"] for r in windows if r["form"] == "grouped")
    assert any(r["mask"] for r in windows if r["form"] == "mask" and r["block"] == "shifted")


@pytest.mark.slow
def test_dry_run_composition_and_training(dry_run):
    w = dry_run[1]["parts"]["wan14b"]["results"]
    comp = w["composition"]
    by = {r["stage"]: r for r in comp["stages"]}
    assert by["base"]["s_per_step"] == pytest.approx(w["cases"]["target"]["ms"] / 1e3)
    sample = dry_run[1]["parts"]["refiner_sample"]["results"]["cases"]["target"]
    assert by["refine"]["s_per_step"] == pytest.approx(sample["per_step_ms"] / 1e3)
    assert comp["speedup"] == pytest.approx(comp["baseline_s"] / comp["surf_s"])
    costs = cost.run_costs(cost.RunSettings())
    assert w["flops_prediction"]["speedup"] == pytest.approx(costs["speedup"])
    assert w["paper"] == {"baseline_s": 3497, "surf_s": 278, "speedup": 12.58}
    ld = dry_run[1]["parts"]["lightning_deepspeed"]["results"]
    assert ld["train"]["summary"]["steps"] == 5 and ld["checkpoint"]["path_is_dir"]
    assert any("zero_pp_rank_0" in f for f in ld["checkpoint"]["files"])  # a ZeRO checkpoint directory
    assert ld["export"]["max_abs_diff"] == 0.0 and ld["load"]["forward_finite"]


def test_compose_matches_hand_computation():
    """Baseline 50 x 20 s; SURF 10 x 5 + 30 x 1 + 10 x 0.5 = 85 s (the paper's plan; one step = one CFG forward)."""
    step = {"base": 20.0, "prefix": 5.0, "preview": 1.0, "refine": 0.5}
    c = G.compose(cost.run_costs(cost.RunSettings()), step)
    assert c["baseline_s"] == pytest.approx(1000.0) and c["surf_s"] == pytest.approx(85.0)
    assert c["speedup"] == pytest.approx(1000 / 85)
    assert [(r["stage"], r["steps"]) for r in c["stages"]] == [
        ("base", 50),
        ("prefix", 10),
        ("preview", 30),
        ("refine", 10),
    ]
    # rule `paper` evaluates the velocity once more at the switch: 11 prefix steps
    c = G.compose(cost.run_costs(cost.RunSettings(rule="paper")), step)
    assert c["surf_s"] == pytest.approx(11 * 5 + 30 * 1 + 10 * 0.5)


def test_compose_without_a_stage_says_why():
    c = G.compose(cost.run_costs(cost.RunSettings()), {"base": 20.0, "prefix": 5.0, "preview": 1.0, "refine": None})
    assert c["baseline_s"] == pytest.approx(1000.0) and c["surf_s"] is None and c["speedup"] is None
    assert "refine" in c["null_reasons"]["surf_s"] and G.unexplained_nulls(c) == []


def test_unexplained_nulls():
    assert G.unexplained_nulls({"a": None, "b": 1, "null_reasons": {}}) == [".a"]
    assert G.unexplained_nulls({"a": None, "null_reasons": {"a": "CPU run"}}) == []
    assert G.unexplained_nulls({"status": "failed", "reason": "OOM", "x": {"a": None, "null_reasons": {}}}) == []
    assert G.unexplained_nulls({"status": "failed", "reason": None}) == [".reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_real_run_without_cuda_is_one_clear_error(tmp_path):
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "--dry-run" in p.stderr and "Traceback" not in p.stderr
    assert not list(tmp_path.iterdir())


def test_failures_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """An OOM in one case leaves the other case measured; a part that raises is recorded and later parts run,
    with the composition saying which step time it lacks; the JSON stays fully explained."""
    real_measure = G.measure

    def measure(rec, *a, **kw):
        if rec.get("impl") == "mask":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_measure(rec, *a, **kw)

    def broken(*a, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(G, "measure", measure)
    monkeypatch.setattr(G, "part_refiner_sample", broken)
    args = ["--dry-run", "--out-dir", str(tmp_path), "--parts", "refiner_train,refiner_sample,wan14b", "--no-compile"]
    assert G.main(args) == 0
    doc = json.loads((tmp_path / "dry-run-cpu.json").read_text())
    parts = doc["parts"]
    train = parts["refiner_train"]
    assert train["status"] == "ok" and train["results"]["cases"]["grouped"]["status"] == "ok"
    mask = train["results"]["cases"]["mask"]
    assert mask["status"] == "failed" and mask["reason"].startswith("OutOfMemoryError") and "mask" in train["reason"]
    sample = parts["refiner_sample"]
    assert sample["status"] == "failed" and "illegal memory access" in sample["reason"]
    assert all(c["status"] == "skipped" for c in sample["results"]["cases"].values())
    wan = parts["wan14b"]
    assert wan["status"] == "ok" and wan["results"]["composition"]["surf_s"] is None
    assert wan["results"]["composition"]["baseline_s"] > 0
    assert "refiner_sample" in wan["results"]["composition"]["null_reasons"]["refiner_step_source"]
    assert parts["environment"]["status"] == "skipped" and parts["lightning_deepspeed"]["reason"] == "not in --parts"
    assert doc["compile"]["enabled"] is False
    for p in ("refiner_sample", "wan14b"):
        assert parts[p]["results"]["compiled"]["target"]["reason"] == "--no-compile"
    assert G.unexplained_nulls(doc) == []


def test_compiled_twins_fit_the_deadline_and_a_compile_failure_is_recorded(tmp_path, monkeypatch):
    """A compiled case whose compile estimate does not fit the part's deadline is skipped with the estimate, and a
    failing compilation is recorded; the eager cases, the composition and the other parts are unaffected."""
    from surf_train.models.refiner import Refiner

    def no_compiler(self, **kw):
        raise RuntimeError("InductorError: no working C++ compiler found")

    plan = G.Plan.dry()
    plan.compile_estimate_s = {**plan.compile_estimate_s, "wan14b": 1e4}
    monkeypatch.setattr(G.Plan, "dry", classmethod(lambda cls: plan))
    monkeypatch.setattr(Refiner, "compile_repeated_blocks", no_compiler)
    assert G.main(["--dry-run", "--out-dir", str(tmp_path), "--parts", "refiner_sample,wan14b"]) == 0
    doc = json.loads((tmp_path / "dry-run-cpu.json").read_text())
    sample, wan = doc["parts"]["refiner_sample"], doc["parts"]["wan14b"]
    c = sample["results"]["compiled"]["target"]
    assert c["status"] == "failed" and "no working C++ compiler" in c["reason"] and c["ms"] is None
    assert sample["status"] == "ok" and "compiled target" in sample["reason"]
    c = wan["results"]["compiled"]["target"]
    assert c["status"] == "skipped" and "compilation" in c["reason"] and "part deadline" in c["reason"]
    assert all(e["status"] == "ok" for p in (sample, wan) for e in p["results"]["cases"].values())
    assert wan["results"]["composition"]["speedup"] > 0 and G.unexplained_nulls(doc) == []
    md = (tmp_path / "dry-run-cpu.md").read_text()
    assert "| refiner_sample | target 128x64 | failed |" in md and "| wan14b | target 128x64 | skipped |" in md


def test_real_training_overrides_compose_to_the_wan_experiment(tmp_path):
    """The GPU run's `python -m surf_train` overrides: bf16-mixed Lightning DeepSpeed ZeRO-2 on one GPU, EMA on,
    a ~140M-parameter Refiner with the paper's text width and window."""
    from hydra import compose, initialize_config_dir

    from surf_train import CONF_DIR
    from surf_train.models.refiner import Refiner, num_params, refiner_config
    from surf_train.training.train import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=G.train_overrides(G.Plan(dry_run=False), tmp_path, tmp_path / "run"))
    t = cfg.trainer
    assert (t.accelerator, t.devices, t.precision, t.max_steps) == ("gpu", 1, "bf16-mixed", 5)
    assert t.strategy._target_.endswith("deepspeed_strategy") and t.strategy.stage == 2
    assert cfg.module.ema_decay and cfg.module.decode_base is None and cfg.data.num_workers == 2
    rc = refiner_config(cfg.model)
    assert (rc.dim, rc.depth, rc.head_dim, rc.text_dim, rc.window) == (1024, 8, 128, 4096, (4, 16, 16))
    with torch.device("meta"):
        assert 100e6 < num_params(Refiner.from_cfg(rc)) < 200e6


def test_wan_14b_builds_like_from_pretrained_on_meta():
    """The released config at full size on the meta device: 14.3B parameters, bf16 but for the modules diffusers
    keeps in float32, RoPE tables rebuilt."""
    from surf_train.cost import ARCH

    net = G.wan_on_device(ARCH["wan2.1_t2v_14b"], torch.device("meta"), torch.bfloat16)
    assert 14.2e9 < sum(p.numel() for p in net.parameters()) < 14.4e9
    fp32 = {n for n, p in net.named_parameters() if p.dtype == torch.float32}
    assert "blocks.0.scale_shift_table" in fp32 and "blocks.0.norm2.weight" in fp32
    assert "blocks.0.ffn.net.0.proj.weight" not in fp32 and all(
        set(n.split(".")) & set(net._keep_in_fp32_modules) for n in fp32
    )
    assert [n for n, _ in net.named_buffers()] == ["rope.freqs_cos", "rope.freqs_sin"]


def test_ti2v_5b_part_builds_the_released_shape_on_meta():
    """The ti2v5b part's transformer is the released TI2V-5B (5B parameters, 48 channels) and its cases are the
    704x1280 and 352x640 latents of 121 frames; its FLOPs count the per-token time embedding."""
    from surf_train.cost import ARCH, total, wan_flops

    plan = G.Plan(dry_run=False)
    cases = G.skeleton(plan)["parts"]["ti2v5b"]["results"]["cases"]
    assert {k: c["latent"] for k, c in cases.items()} == {"target": [48, 31, 44, 80], "preview": [48, 31, 22, 40]}
    config = {k: v for k, v in ARCH["wan2.2_ti2v_5b"].items() if k != "expand_timesteps"}
    net = G.wan_on_device(config, torch.device("meta"), torch.bfloat16)
    assert 4.9e9 < sum(p.numel() for p in net.parameters()) < 5.1e9
    per_token = total(wan_flops(ARCH["wan2.2_ti2v_5b"], (48, 31, 44, 80), 512, batch=2))
    assert per_token > total(wan_flops(config, (48, 31, 44, 80), 512, batch=2))


def test_refiner_sample_part_keeps_the_fp32_modules(tmp_path):
    """The sampling part's bf16 Refiner has the dtypes from_pretrained(torch_dtype=bf16) loads: the modules the
    Refiner keeps in float32 stay float32 (a plain .to(bf16) cast them too)."""
    from surf_train.models.refiner import Refiner, RefinerConfig

    cfg = RefinerConfig(in_channels=4, dim=24, heads=2, depth=2, text_dim=16)
    net = G.refiner_in_dtype(cfg, torch.bfloat16)
    Refiner.from_cfg(cfg).save_pretrained(tmp_path)
    want = {n: p.dtype for n, p in Refiner.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).named_parameters()}
    got = {n: p.dtype for n, p in net.named_parameters()}
    assert got == want and not net.training and not any(p.requires_grad for p in net.parameters())
    assert got["blocks.0.scale_shift_table"] == torch.float32 and got["blocks.0.attn1.to_q.weight"] == torch.bfloat16
