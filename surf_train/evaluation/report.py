"""What the evaluations write: markdown tables of both modes of surf_train.evaluate, the fidelity-versus-cost
plot, the grid PNG of clips side by side, and files and figures written whole (a temporary file, then a rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def table_head(*columns: str) -> list[str]:
    """A markdown table's header and separator lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def iou_table(result: dict) -> list[str]:
    """Object-mask IoU against the reference per captioned shape (thin objects: bar, pillar)."""
    by = result["iou_by_shape"]
    shapes = list(next(iter(by.values())))
    lines = ["", "Object-mask IoU against the reference, by the caption's shape (1 = the same pixels):", ""]
    lines += table_head("method", *shapes)
    return lines + [f"| {m} | " + " | ".join(f"{v[s]:.3f}" for s in shapes) + " |" for m, v in by.items()]


def format_table(result: dict) -> str:
    """table.md of the default mode: every method's means, then the paired differences."""
    cfg = result["config"]
    lines = [
        f"N = {result['n']} (caption, seed) pairs, {cfg['steps']} steps, base `{cfg['base']}`; "
        f"SURF = Refiner on `{cfg['surf_rule']}@{cfg['surf_switch']}`. Position and speed errors are fractions "
        f"of the frame; match rates against the caption.",
        "",
        "PSNR and SSIM are on each method's own grid (previews at the preview size, against the reference "
        "area-pooled to it); PSNR@preview is every method and the reference area-pooled to the preview grid.",
        "",
        *table_head(
            "method",
            "PSNR dB",
            "PSNR@preview dB",
            "SSIM",
            "object IoU",
            "position err",
            "colour",
            "shape",
            "direction",
            "all 3",
            "speed err",
            "GFLOPs",
            "ms/clip",
        ),
    ]
    for m, v in result["methods"].items():
        psnr, psnr_lo = ("ref", "ref") if m == "reference" else (f"{v['psnr']:.2f}", f"{v['psnr_lo']:.2f}")
        lines.append(
            f"| {m} | {psnr} | {psnr_lo} | {v['ssim']:.3f} | {v['obj_iou']:.3f} | {v['pos_err']:.4f} | "
            f"{v['colour']:.2f} | {v['shape']:.2f} | {v['direction']:.2f} | {v['all3']:.2f} | {v['speed_err']:.4f} | "
            f"{v['gflops']:.2f} | {1000 * v['seconds']:.0f} |"
        )
    lines += iou_table(result)
    lines += [
        "",
        "Paired differences (a - b, mean over clips, 95% bootstrap interval; lower is better for position "
        "error, higher for PSNR/SSIM):",
        "",
        *table_head("a", "b", "metric", "mean", "95% CI", "CI excludes 0"),
    ]
    for d in result["paired"]:
        lines.append(
            f"| {d['a']} | {d['b']} | {d['metric']} | {d['mean']:+.4f} | [{d['ci95'][0]:+.4f}, "
            f"{d['ci95'][1]:+.4f}] | {'yes' if d['separated'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def format_sr_table(result: dict) -> str:
    """table_sr.md: every method's means, the K table, then the gains over bilinear."""
    cfg = result["config"]
    lines = [
        f"Super-resolution check, N = {result['n']} (caption, seed) pairs, base `{cfg['base']}`, {cfg['steps']} steps: "
        f"the native generation's latent area-pooled to the preview grid, upsampled back, compared with the native "
        f"generation. Object = the reference's detected object grown by {cfg['mask_dilate']} px; background = the "
        f"rest. Sharpness = mean squared Laplacian over the reference's (1 = as sharp). Refiner: `{cfg['refiner']}`"
        + (f"; compare: `{cfg['compare']}` at its own K." if cfg.get("compare") else "."),
        "",
        *table_head(
            "method",
            "PSNR dB",
            "PSNR object dB",
            "PSNR background dB",
            "PSNR@preview dB",
            "SSIM",
            "sharpness [95% CI]",
            "object IoU",
            "position err",
            "all 3",
            "GFLOPs",
            "ms/clip",
        ),
    ]
    for m, v in result["methods"].items():
        ci = v["sharpness_ci95"]
        lines.append(
            f"| {m} | {_f(v['psnr'], '.2f')} | {_f(v['psnr_obj'], '.2f')} | {_f(v['psnr_bg'], '.2f')} | "
            f"{_f(v['psnr_lo'], '.2f')} | {v['ssim']:.3f} | {v['sharpness']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
            f"{v['obj_iou']:.3f} | {v['pos_err']:.4f} | {v['all3']:.2f} | {v['gflops']:.3f} | "
            f"{1000 * v['seconds']:.1f} |"
        )
    return "\n".join(lines + _k_table(result) + iou_table(result) + _sr_gains(result)) + "\n"


def _k_table(result: dict) -> list[str]:
    """table_sr.md's K table: fidelity and cost of the Refiner at each K (none without a Refiner)."""
    if not result["k_table"]:
        return []
    lines = [
        "",
        "Refiner steps K (fidelity and cost; ms measured on this machine, GFLOPs analytic, per clip):",
        "",
        *table_head(
            "K",
            "PSNR dB",
            "PSNR object dB",
            "PSNR background dB",
            "SSIM",
            "sharpness",
            "object IoU",
            "GFLOPs",
            "ms/clip",
        ),
    ]
    for r in result["k_table"]:
        lines.append(
            f"| {r['k']} | {_f(r['psnr'], '.2f')} | {_f(r['psnr_obj'], '.2f')} | {_f(r['psnr_bg'], '.2f')} | "
            f"{r['ssim']:.3f} | {r['sharpness']:.3f} | {r['obj_iou']:.3f} | {r['gflops']:.3f} | {r['ms']:.1f} |"
        )
    return lines


def _sr_gains(result: dict) -> list[str]:
    """table_sr.md's paired gains with their bootstrap intervals."""
    lines = [
        "",
        "Gains (a - b, mean over clips, 95% bootstrap interval; higher is better except position error; for "
        "sharpness nearer 1 is better):",
        "",
        *table_head("a", "b", "metric", "mean", "95% CI", "CI excludes 0"),
    ]
    for d in result["paired"]:
        lo, hi = d["ci95"]
        lines.append(
            f"| {d['a']} | {d['b']} | {d['metric']} | {_f(d['mean'], '+.4f')} | [{_f(lo, '+.4f')}, {_f(hi, '+.4f')}] | "
            f"{'yes' if d['separated'] else 'no'} |"
        )
    return lines


def two_panels():
    """A matplotlib (figure, (left, right) axes) pair for a plot file (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(11, 4))


def save_figure(fig, path: Path) -> None:
    """Lay out, write as PNG through a temporary file, and close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot(result: dict, path: Path) -> None:
    """Position error and PSNR versus GFLOPs per clip, one line per rule across switch steps."""
    cfg, meth = result["config"], result["methods"]
    fig, axes = two_panels()
    for ax, metric, label in (
        (axes[0], "pos_err", "object position error (frac. of frame)"),
        (axes[1], "psnr_lo", "PSNR vs reference on the preview grid (dB)"),
    ):
        for r in cfg["rules"]:
            pts = sorted((meth[f"{r}@{k}"]["gflops"], meth[f"{r}@{k}"][metric], k) for k in cfg["switches"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"preview, {r}")
            for x, y, k in pts:
                ax.annotate(f"k={k}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        for m, style in (("direct", "ks"), ("upsampled", "c^"), ("surf", "r*")):
            if m in meth:
                ax.plot(meth[m]["gflops"], meth[m][metric], style, markersize=9, label=m)
        if metric == "pos_err":
            ax.plot(meth["reference"]["gflops"], 0.0, "gD", label="reference (native)")
        ax.set_xlabel("GFLOPs per clip")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Toy world: fidelity to the native generation vs cost (N={result['n']})")
    save_figure(fig, path)


def grid_png(
    columns: dict[str, torch.Tensor], path: Path, scale: int = 4, gap: int = 6, frame_gap: int = 2, header: int = 14
) -> tuple[int, int]:
    """PNG of (N, 3, F, H, W) clips in [-1, 1]: one row per clip, one panel per column (its F frames side by side,
    `frame_gap` gray pixels apart, each enlarged `scale` times with nearest neighbour), the column names on top.
    Returns its (width, height)."""
    from PIL import Image, ImageDraw

    vids = list(columns.values())
    n, _, f, h, w = vids[0].shape
    fw, fh = f * w * scale + (f - 1) * frame_gap, h * scale  # one panel
    size = (len(vids) * fw + (len(vids) + 1) * gap, header + n * fh + (n + 1) * gap)
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for c, (name, v) in enumerate(columns.items()):
        x0 = gap + c * (fw + gap)
        draw.text((x0, 1), name, fill=(0, 0, 0))
        # (N, 3, F, H, W) -> (N, F, H*scale, W*scale, 3) uint8
        u = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
        u = u.repeat_interleave(scale, 2).repeat_interleave(scale, 3).numpy()
        for r in range(n):
            y0 = header + gap + r * (fh + gap)
            draw.rectangle((x0, y0, x0 + fw - 1, y0 + fh - 1), fill=(160, 160, 160))  # shows between the frames
            for k in range(f):
                img.paste(Image.fromarray(u[r, k]), (x0 + k * (w * scale + frame_gap), y0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
    return size


def keep_shown(shown: dict[str, list[torch.Tensor]], videos: dict[str, torch.Tensor], clips: int) -> None:
    """Add each shown method's (3, F, H, W) clips of a batch until it has `clips` of them."""
    for m in shown:
        shown[m] += list(videos[m][: clips - len(shown[m])])


def write_grid(cfg, shown: dict[str, list[torch.Tensor]], name: str) -> None:
    """The grid PNG of the first --grid-clips clips of each shown method, in --out-dir (none at --grid-clips 0)."""
    if cfg.grid_clips > 0:
        grid_png({m: torch.stack(v) for m, v in shown.items()}, Path(cfg.out_dir) / name, cfg.grid_scale)


def write_files(out: Path, files: dict[str, str]) -> None:
    """Write each name -> text in `out`, each whole."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def write_outputs(cfg, result: dict) -> None:
    """results.json, table.md and fidelity_vs_cost.png of the default mode in --out-dir."""
    out = Path(cfg.out_dir)
    write_files(out, {"results.json": json.dumps(result, indent=1), "table.md": format_table(result)})
    plot(result, out / "fidelity_vs_cost.png")


def write_sr_outputs(cfg, result: dict) -> None:
    """results_sr.json and table_sr.md in --out-dir."""
    write_files(
        Path(cfg.out_dir), {"results_sr.json": json.dumps(result, indent=1), "table_sr.md": format_sr_table(result)}
    )
