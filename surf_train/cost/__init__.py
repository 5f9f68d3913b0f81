"""The analytic cost model: forward FLOPs of the base DiTs and the Refiner per call (`formulas`), the published
models' architecture tables (`architectures`), baseline vs SURF run plans per stage (`plans`), the toy's measured
cache hit rates composed with those plans (`measured`) and their Markdown tables (`report`); the command line is
`python -m surf_train.flops`. May import `common`, `base` and `models`."""

from surf_train.cost.architectures import ARCH, CFG_FAMILIES, PAPER, TEXT_LEN, BaseArch, vae_decode_flops
from surf_train.cost.formulas import (
    HUNYUAN15_DEFAULTS,
    HUNYUAN_DEFAULTS,
    PFLOP,
    WAN_DEFAULTS,
    block_flops,
    hit_skipped_flops,
    hunyuan15_flops,
    hunyuan_flops,
    metered_flops,
    refiner_flops,
    token_grid,
    total,
    transformer_flops,
    wan_flops,
    window_pairs,
)
from surf_train.cost.measured import MEASURED, TOY_BLOCKS, composed_speedups, measured_accel
from surf_train.cost.plans import PREFIX, RunSettings, Stage, default_settings, paper_comparison, parse_size, run_costs
from surf_train.cost.report import format_composed, format_table

__all__ = [
    "ARCH",
    "CFG_FAMILIES",
    "HUNYUAN15_DEFAULTS",
    "HUNYUAN_DEFAULTS",
    "MEASURED",
    "PAPER",
    "PFLOP",
    "PREFIX",
    "TEXT_LEN",
    "TOY_BLOCKS",
    "WAN_DEFAULTS",
    "BaseArch",
    "RunSettings",
    "Stage",
    "block_flops",
    "composed_speedups",
    "default_settings",
    "format_composed",
    "format_table",
    "hit_skipped_flops",
    "hunyuan15_flops",
    "hunyuan_flops",
    "measured_accel",
    "metered_flops",
    "paper_comparison",
    "parse_size",
    "refiner_flops",
    "run_costs",
    "token_grid",
    "total",
    "transformer_flops",
    "vae_decode_flops",
    "wan_flops",
    "window_pairs",
]
