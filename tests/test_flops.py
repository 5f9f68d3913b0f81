"""Cost model: analytic FLOPs equal FlopCounterMode (exactly), run totals, CLI and bad inputs.

Tolerance: exact equality. FlopCounterMode counts mm/addmm/bmm/convolution/SDPA as 2 FLOPs per
multiply-add with biases excluded, the same convention as surf_train/cost/formulas.py. On CPU the fused SDPA
kernel is not in its registry, so the counted runs force the MATH backend (plain bmm, all queries x keys).
"""

import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from surf_train import cost
from surf_train.common.errors import ConfigError
from surf_train.flops import main
from surf_train.models.refiner import Refiner, RefinerConfig


def _count(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@pytest.fixture(scope="module")
def tiny_wan_net():
    from surf_train.base.tiny import tiny_wan_pipeline

    return tiny_wan_pipeline().transformer.eval()


@pytest.fixture(scope="module")
def tiny_hunyuan_net():
    from surf_train.base.tiny import tiny_hunyuan_pipeline

    return tiny_hunyuan_pipeline().transformer.eval()


# --- architecture constants ------------------------------------------------------------------------


def test_defaults_are_the_published_architectures():
    """The defaults (read from diffusers' constructors) are the released Wan 2.1 14B (Wan-AI/Wan2.1-T2V-14B
    config.json: dim 5120 = 40 heads x 128, ffn 13824, 40 layers, umT5 4096) and HunyuanVideo (hidden 3072 = 24 x
    128, 20 double + 40 single blocks, 2 token-refiner blocks, Llama 4096 + CLIP 768) architectures."""
    w, h = cost.WAN_DEFAULTS, cost.HUNYUAN_DEFAULTS
    assert (w["num_attention_heads"] * w["attention_head_dim"], w["ffn_dim"], w["num_layers"]) == (5120, 13824, 40)
    assert (tuple(w["patch_size"]), w["in_channels"], w["text_dim"], w["image_dim"]) == ((1, 2, 2), 16, 4096, None)
    assert (h["num_attention_heads"] * h["attention_head_dim"], h["num_layers"], h["num_single_layers"]) == (
        3072,
        20,
        40,
    )
    assert (h["num_refiner_layers"], h["mlp_ratio"], h["patch_size"], h["patch_size_t"]) == (2, 4.0, 2, 1)
    assert (h["text_embed_dim"], h["pooled_projection_dim"], h["in_channels"]) == (4096, 768, 16)
    assert cost.ARCH["wan2.1_t2v_14b"] == cost.WAN_DEFAULTS and cost.ARCH["hunyuan_video"] == cost.HUNYUAN_DEFAULTS
    small = cost.ARCH["wan2.1_t2v_1.3b"]
    assert (small["num_attention_heads"] * small["attention_head_dim"], small["ffn_dim"], small["num_layers"]) == (
        1536,
        8960,
        30,
    )


# --- analytic == FlopCounterMode -------------------------------------------------------------------


@pytest.mark.parametrize("latent,batch,text_len", [((16, 3, 8, 12), 1, 7), ((16, 2, 6, 4), 2, 16)])
def test_wan_tiny_matches_flop_counter(tiny_wan_net, latent, batch, text_len):
    cfg = dict(tiny_wan_net.config)
    x = torch.randn(batch, *latent)
    t = torch.full((batch,), 500.0)
    text = torch.randn(batch, text_len, cfg["text_dim"])
    counted = _count(lambda: tiny_wan_net(x, t, text, return_dict=False))
    assert cost.total(cost.wan_flops(cfg, latent, text_len, batch)) == counted
    assert cost.total(cost.transformer_flops(tiny_wan_net, latent, text_len, batch)) == counted


@pytest.mark.parametrize("latent,batch,text_len", [((4, 3, 6, 5), 1, 9), ((4, 2, 4, 4), 2, 5)])
def test_hunyuan_tiny_matches_flop_counter(tiny_hunyuan_net, latent, batch, text_len):
    cfg = dict(tiny_hunyuan_net.config)
    x = torch.randn(batch, *latent)
    t = torch.full((batch,), 500.0)
    text = torch.randn(batch, text_len, cfg["text_embed_dim"])
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, -2:] = 0  # padded tokens are still computed (masked), as in the pipeline
    pooled = torch.randn(batch, cfg["pooled_projection_dim"])
    g = torch.full((batch,), 6000.0)
    counted = _count(lambda: tiny_hunyuan_net(x, t, text, mask, pooled, guidance=g, return_dict=False))
    assert cost.total(cost.hunyuan_flops(cfg, latent, text_len, batch)) == counted
    assert cost.total(cost.transformer_flops(tiny_hunyuan_net, latent, text_len, batch)) == counted


@pytest.mark.parametrize("name,latent", [("wan2.1_t2v_14b", (16, 21, 90, 160)), ("hunyuan_video", (16, 33, 90, 160))])
def test_real_configs_match_flop_counter_on_meta(name, latent):
    """The released architectures at full size, on the meta device (shapes only, about 2 s each)."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cfg = cost.ARCH[name]
    wan = name.startswith("wan")
    with torch.device("meta"):
        net = (WanTransformer3DModel if wan else HunyuanVideoTransformer3DModel)(**cfg)
        x, t = torch.empty(1, *latent), torch.empty(1)
        text = torch.empty(1, cost.TEXT_LEN["wan" if wan else "hunyuan"], 4096)
        extra = () if wan else (torch.ones(1, text.shape[1]), torch.empty(1, 768))
    kw = {} if wan else {"guidance": t}
    counted = _count(lambda: net(x, t, text, *extra, return_dict=False, **kw))
    assert cost.total(cost.BaseArch.from_name(name).flops(latent)) == counted


REFINER_CASES = [  # (latent, window, text tokens, batch)
    ((16, 4, 16, 16), (2, 4, 4), 5, 2),  # windows divide the (4, 8, 8) grid
    ((16, 3, 10, 14), (2, 4, 4), 0, 1),  # (3, 5, 7) grid: padded / partial windows
    ((16, 5, 6, 18), (3, 2, 4), 5, 1),  # odd window sizes, partial on every axis
    ((16, 3, 8, 8), (0, 0, 0), 5, 1),  # window = whole grid (full attention)
    ((16, 3, 8, 8), (8, 9, 9), 0, 1),  # window larger than the grid: whole grid too
]


@pytest.mark.parametrize("impl", ["mask", "grouped"])
@pytest.mark.parametrize("latent,window,text_len,batch", REFINER_CASES)
def test_refiner_matches_flop_counter(latent, window, text_len, batch, impl):
    torch.manual_seed(0)
    cfg = RefinerConfig.preset("tiny", window=window, attn_impl=impl)
    net = Refiner.from_cfg(cfg).eval()
    x = torch.randn(batch, *latent)
    t = torch.rand(batch)
    text = torch.randn(batch, text_len, cfg.text_dim) if text_len else None
    counted = _count(lambda: net(x, t, x, text, return_dict=False))
    assert cost.total(cost.refiner_flops(cfg, latent, text_len, batch=batch)) == counted


def test_refiner_with_ffn_conv_matches_flop_counter():
    cfg = RefinerConfig.preset("tiny", ffn_conv=3)
    x, t = torch.randn(2, 16, 3, 10, 14), torch.rand(2)
    counted = _count(lambda: Refiner.from_cfg(cfg).eval()(x, t, x))
    parts = cost.refiner_flops(cfg, (16, 3, 10, 14), batch=2)
    assert cost.total(parts) == counted and parts["ffn_conv"] == 2 * 4 * 2 * 105 * 128 * 9


def test_window_pairs_mask_counts_padding_grouped_is_exact():
    grid = (3, 5, 7)
    # exact partition, plain windows (2, 4, 4): pieces t 2+1, h 4+1, w 4+3
    assert cost.window_pairs(grid, (2, 4, 4), False, "grouped") == (4 + 1) * (16 + 1) * (16 + 9)
    # shifted by (1, 2, 2): pieces t 1+2, h 2+3, w 2+4+1
    assert cost.window_pairs(grid, (2, 4, 4), True, "grouped") == (1 + 4) * (4 + 9) * (4 + 16 + 1)
    # padded to (4, 8, 8): 2 x 2 x 2 windows of 32 slots, shifted or not
    assert (
        cost.window_pairs(grid, (2, 4, 4), True, "mask")
        == cost.window_pairs(grid, (2, 4, 4), False, "mask")
        == 8 * 32**2
    )
    assert (
        cost.window_pairs(grid, (0, 0, 0), True, "grouped")
        == cost.window_pairs(grid, (0, 0, 0), True, "mask")
        == 105**2
    )
    with pytest.raises(ConfigError, match="impl"):
        cost.window_pairs(grid, (2, 4, 4), False, "flash")


def test_windowed_attention_linear_full_quadratic():
    """Tokens x1, x2, x4 along W at a fixed window: windowed cost linear, full attention quadratic."""
    shapes = [(16, 8, 64, 64 * k) for k in (1, 2, 4)]
    mask = [cost.refiner_flops(RefinerConfig.preset("paper", attn_impl="mask"), s)["self_attn_sdpa"] for s in shapes]
    grouped = [cost.refiner_flops(RefinerConfig.preset("paper"), s)["self_attn_sdpa"] for s in shapes]
    full = [cost.refiner_flops(RefinerConfig.preset("paper", window=(0, 0, 0)), s)["self_attn_sdpa"] for s in shapes]
    assert mask[1] == 2 * mask[0] and mask[2] == 4 * mask[0]  # window (4, 16, 16) divides (8, 32, 32k)
    # Shifted blocks have two half windows at each border: affine in tokens (constant increment per token).
    assert grouped[2] - grouped[1] == 2 * (grouped[1] - grouped[0]) and grouped[0] < mask[0]
    assert full[1] == 4 * full[0] and full[2] == 16 * full[0]
    cfg = RefinerConfig.preset("paper")  # projections and FFN are linear in tokens for both
    assert cost.refiner_flops(cfg, shapes[1])["ffn"] == 2 * cost.refiner_flops(cfg, shapes[0])["ffn"]


# --- runs ------------------------------------------------------------------------------------------


def test_cfg_doubles_wan_base_cost():
    on = cost.run_costs(cost.RunSettings(model="wan2.1_t2v_1.3b", target=(832, 480), cfg=True))
    off = cost.run_costs(cost.RunSettings(model="wan2.1_t2v_1.3b", target=(832, 480), cfg=False))
    auto = cost.run_costs(cost.RunSettings(model="wan2.1_t2v_1.3b", target=(832, 480)))
    assert on["baseline_pflops"] == pytest.approx(2 * off["baseline_pflops"], rel=1e-12)
    assert auto["baseline_pflops"] == on["baseline_pflops"]  # Wan uses CFG by default
    base = {s["stage"]: s for s in on["stages"] if s["run"] == "surf"}
    assert base["prefix"]["calls"] == 2 * 10 and base["preview"]["calls"] == 2 * 30 and base["refine"]["calls"] == 10
    hy = cost.run_costs(cost.RunSettings(model="hunyuan_video", frames=129))
    assert hy["settings"]["cfg_factor"] == 1 and hy["stages"][0]["calls"] == 50


def test_run_totals_are_stage_sums_and_paper_baseline_within_1_percent():
    r = cost.run_costs(cost.RunSettings())  # Wan 14B, 1280x720x81, 50 steps, CFG
    stages = r["stages"]
    assert r["baseline_pflops"] == pytest.approx(sum(s["pflops"] for s in stages if s["run"] == "baseline"))
    assert r["surf_pflops"] == pytest.approx(sum(s["pflops"] for s in stages if s["run"] == "surf"))
    assert r["speedup"] == pytest.approx(r["baseline_pflops"] / r["surf_pflops"])
    assert [s["stage"] for s in stages] == ["base", "prefix", "preview", "refine"]
    assert [s["size"] for s in stages] == ["1280x720", "832x480", "416x240", "1280x720"]
    # Paper: 658.46 PFLOPs; the matmul-only count is 0.93% lower (elementwise work, see cost/formulas.py).
    assert 0.99 < r["baseline_pflops"] / 658.46 < 1.0


def test_paper_rule_costs_one_more_prefix_call():
    pool = cost.run_costs(cost.RunSettings(rule="pool"))["stages"][1]["calls"]
    paper = cost.run_costs(cost.RunSettings(rule="paper"))["stages"][1]["calls"]
    assert paper == pool + 2  # one more velocity at the switch, both CFG branches


def test_cli_json_has_required_keys(capsys):
    main(["--json"])
    out = json.loads(capsys.readouterr().out)
    assert len(out["runs"]) == 4 and "wan2.1_t2v_14b" in out["paper"]
    for r in out["runs"]:
        assert {"baseline_pflops", "surf_pflops", "speedup", "stages"} <= set(r)
        assert all({"run", "stage", "pflops", "calls", "tflops_per_call"} <= set(s) for s in r["stages"])
    main(
        [
            "--model",
            "wan2.1_t2v_1.3b",
            "--target",
            "832x480",
            "--steps",
            "30",
            "--surf-steps",
            "30",
            "--switch",
            "5",
            "--window",
            "2,8,8",
            "--impl",
            "mask",
            "--json",
        ]
    )
    (r,) = json.loads(capsys.readouterr().out)["runs"]
    assert r["settings"]["refiner_config"]["window"] == [2, 8, 8] and r["settings"]["attn_impl"] == "mask"
    assert r["stages"][1]["calls"] == 10 and r["stages"][2]["calls"] == 50


def test_cli_table_and_help(capsys):
    main(["--model", "hunyuan_video"])
    out = capsys.readouterr().out
    assert "| surf | refine | 1280x720 |" in out and "FLOPs speedup" in out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "multiply-add = 2 FLOPs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "wan2.1_t2v_14b", "--target", "1280x721"], "height=721 must be a positive multiple of 16"),
        (["--model", "wan2.1_t2v_14b", "--preview", "424x240"], "width=424 must be a positive multiple of 16"),
        (["--model", "wan2.1_t2v_14b", "--frames", "80"], "frames=80 must be 4\\*n\\+1"),
        (["--model", "wan2.1_t2v_14b", "--target", "1280"], "WIDTHxHEIGHT"),
        (["--model", "wan2.1_t2v_14b", "--switch", "60"], "switch must be in"),
        (["--model", "wan2.1_t2v_14b", "--refiner", "huge"], "unknown refiner preset"),
    ],
)
def test_cli_bad_input_is_a_clear_error(argv, match):
    with pytest.raises(SystemExit, match=match):
        main(argv)


def test_api_bad_shapes():
    with pytest.raises(ConfigError, match="not divisible by patch"):
        cost.wan_flops(cost.WAN_DEFAULTS, (16, 21, 91, 160))
    with pytest.raises(ConfigError, match="channels"):
        cost.hunyuan_flops(cost.HUNYUAN_DEFAULTS, (4, 33, 90, 160))
    with pytest.raises(ConfigError, match="not divisible by patch"):
        cost.refiner_flops(RefinerConfig(), (16, 3, 9, 8))
    with pytest.raises(ConfigError, match="no architecture constants"):
        cost.BaseArch.from_name("tiny")
    with pytest.raises(ConfigError, match="no FLOPs model"):
        cost.transformer_flops(torch.nn.Linear(2, 2), (16, 1, 2, 2), 1)
    assert math.isclose(
        cost.run_costs(cost.RunSettings(window=(0, 0, 0)))["stages"][3]["tflops_per_call"],
        cost.total(cost.refiner_flops(RefinerConfig.preset("paper", window=(0, 0, 0)), (16, 21, 90, 160), 512)) / 1e12,
    )


def test_vae_decode_is_added_to_both_runs():
    r = cost.run_costs(
        cost.RunSettings(
            model="hunyuan_video",
            target=(256, 256),
            frames=9,
            preview=(128, 128),
            prefix=(256, 256),
            switch=2,
            vae=True,
        )
    )
    vae = [s for s in r["stages"] if s["stage"] == "vae_decode"]
    assert [s["run"] for s in vae] == ["baseline", "surf"] and vae[0]["pflops"] == vae[1]["pflops"] > 0
    assert r["surf_pflops"] == pytest.approx(sum(s["pflops"] for s in r["stages"] if s["run"] == "surf"))


def test_cli_bad_window(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "wan2.1_t2v_14b", "--window", "4,16"])
    assert e.value.code == 2 and "3 comma-separated ints" in capsys.readouterr().err


def test_cfg_truncation_counts_single_branch_calls():
    r = cost.run_costs(cost.RunSettings(cfg_stop=15))  # Wan 14B: baseline 50 steps, SURF 10 + 30, CFG x2
    calls = {s["stage"]: s["calls"] for s in r["stages"]}
    assert calls == {"base": 15 * 2 + 35, "prefix": 10 * 2, "preview": 5 * 2 + 25, "refine": 10}
    low = cost.run_costs(cost.RunSettings(cfg_low=False))
    at_switch = cost.run_costs(cost.RunSettings(cfg_stop=10))
    assert low["surf_pflops"] == pytest.approx(at_switch["surf_pflops"])
    assert low["surf_pflops"] < cost.run_costs(cost.RunSettings())["surf_pflops"]
    assert cost.run_costs(cost.RunSettings(cfg_stop=0))["stages"][0]["calls"] == 50


def test_cache_hits_leave_only_the_first_block():
    plain, hit = (cost.run_costs(cost.RunSettings(cache_hits=h))["stages"][0] for h in (0.0, 1.0))
    block = cost.block_flops("wan", cost.BaseArch.from_name("wan2.1_t2v_14b").config, plain["latent"], 512)
    assert len(block) == 1  # Wan: one list of 40 blocks, counted per block
    per_block = next(iter(block.values()))
    assert plain["tflops_per_call"] - hit["tflops_per_call"] == pytest.approx(39 * per_block / 1e12, rel=1e-9)
    with pytest.raises(ConfigError, match="cache_hits"):
        cost.run_costs(cost.RunSettings(cache_hits=1.5))


def test_composed_speedups_from_a_toy_measurement(tmp_path, capsys):
    toy = {
        "n": 8,
        "config": {"steps": 20, "switch": 5, "cfg_stop": 8, "fewer_steps": 10},
        "methods": {
            "baseline+cache": {"blocks_run": 0.625},
            "surf+cache": {"blocks_run": 0.4},
            "surf+cache+cfg-stop": {"blocks_run": 0.55},
            "surf@10": {"blocks_run": 1.0, "settings": {"switch": 3}},
        },
    }
    (tmp_path / "accel.json").write_text(json.dumps(toy))
    m = cost.measured_accel(str(tmp_path / "accel.json"))
    assert m["hits"]["baseline+cache"] == 0.5 and m["hits"]["surf+cache"] == 0.8 and m["cfg_stop"] == 8
    with pytest.raises(ConfigError, match="none.json"):
        cost.measured_accel(tmp_path / "none.json")
    rows = cost.composed_speedups(m)
    assert [r["target"] for r in rows] == ["1280x720"] * 9 + ["1920x1072"] * 9
    by = {(r["target"], r["method"]): r for r in rows}
    for t in ("1280x720", "1920x1072"):
        assert by[(t, "baseline")]["speedup"] == 1 and by[(t, "surf")]["vs_surf"] == 1
        assert by[(t, "surf+cache")]["vs_surf"] > by[(t, "surf+cache+cfg-stop (16)")]["vs_surf"] > 1  # 0.8 vs 0.6
        assert by[(t, "surf+cfg-stop (16)")]["vs_surf"] > 1 and by[(t, "surf+cache+cfg-low")]["cache_hits"] == 0
    few = cost.run_costs(cost.RunSettings(target=(1920, 1072), surf_steps=20, switch=6))["surf_pflops"]
    assert by[("1920x1072", "surf@20 (6 + 14 steps)")]["pflops"] == pytest.approx(few)  # the toy's 3 of 10
    main(["--measured", str(tmp_path / "accel.json")])
    out = capsys.readouterr().out
    assert "SURF composed with acceleration plug-ins" in out and "| 1920x1072 | surf+cache | 0.80 |" in out


def test_measured_file_is_named_when_absent_and_optional_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """--measured names a file that must exist; without it the shipped one is read where it exists (a checkout),
    and an installed wheel, which has none, prints the composed table with hit rates 0."""
    with pytest.raises(SystemExit, match=r"^error: toy acceleration results .*none\.json not found"):
        main(["--measured", str(tmp_path / "none.json")])
    from surf_train import flops

    monkeypatch.setattr(flops, "DATA_DIR", tmp_path)
    main([])
    assert f"No toy measurement ({cost.MEASURED} absent): cache hit rates 0." in capsys.readouterr().out


def test_toy_blocks_come_from_the_toy_base_config():
    from surf_train import ASSETS_DIR
    from surf_train.base.tiny import TOY_WAN_TRANSFORMER

    path = ASSETS_DIR / "toy_base" / "transformer" / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    shipped = json.loads(path.read_text())
    assert cost.TOY_BLOCKS == shipped["num_layers"] == 4
    assert {k: shipped[k] for k in TOY_WAN_TRANSFORMER} == json.loads(json.dumps(TOY_WAN_TRANSFORMER))
