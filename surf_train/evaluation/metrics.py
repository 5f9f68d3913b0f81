"""Per-clip metrics of a decoded clip against the native reference: PSNR (whole, on the preview grid, inside and
outside the reference's object), SSIM, sharpness, object position, object-mask IoU and caption match."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MISSING = 0.5  # position error of a frame where only one of the two clips shows the object
PSNR_CAP = 99.0  # identical clips (infinite PSNR) score this, so results stay plain JSON

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def hf_energy(video: torch.Tensor) -> float:
    """High-frequency energy of a (3, F, H, W) clip: mean squared Laplacian of its frames (interior pixels)."""
    x = video.clamp(-1, 1).float().transpose(0, 1).reshape(-1, 1, *video.shape[-2:])  # (F*3, 1, H, W)
    return float(F.conv2d(x, _LAPLACIAN.view(1, 1, 3, 3)).pow(2).mean())


def sharpness(video: torch.Tensor, ref: torch.Tensor) -> float:
    """hf_energy of the clip over the reference's on the same grid: 1.0 = as sharp as the base model, blur < 1."""
    return hf_energy(video) / max(hf_energy(ref), 1e-12)


def region_masks(ref_video: torch.Tensor, ref_det, dilate: int) -> tuple[np.ndarray, np.ndarray]:
    """(object, background) (F, H, W) bool masks of the reference that partition it: the detected object
    (coverage >= 0.5) grown by `dilate` pixels to take its edge, and the flat rest."""
    from surf_train.data.toyworld import object_mask

    obj = object_mask(ref_video, ref_det, dilate=dilate)
    return obj, ~obj


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty (they agree: no object)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def masked_psnr(video: torch.Tensor, ref: torch.Tensor, mask: np.ndarray) -> float | None:
    """PSNR (data range 2) over the pixels of the (F, H, W) mask, all channels; None for an empty mask."""
    if not mask.any():
        return None
    m = torch.from_numpy(mask)
    se = (video.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2)[:, m]  # (3, pixels)
    mse = float(se.mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * float(np.log10(4.0 / mse)))


def clip_metrics(
    video: torch.Tensor, ref_video: torch.Tensor, ref_det, caption: str, preview_hw: tuple[int, int] | None = None
) -> dict[str, float]:
    """Metrics of one (3, F, h, w) clip against the (3, F, H, W) reference and its detection.

    `psnr` is on the clip's own grid; `psnr_lo` on the preview grid `preview_hw` (both area-pooled to
    it), so previews, upsampled and refined clips compare on one grid. `sharpness`: see sharpness(). `obj_iou`:
    the pixels the reference's object covers in the clip against those it covers in the reference, on the clip's
    grid (a thin object that breaks up or smears scores low).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from surf_train.data.toyworld import detect, object_mask

    ref = ref_video
    if ref.shape[-2:] != video.shape[-2:]:
        ref = F.adaptive_avg_pool3d(ref, video.shape[1:])  # the reference at this clip's size
    a, b = (v.transpose(0, 1).clamp(-1, 1) for v in (video, ref))  # (F, 3, h, w)
    det = detect(video)
    gap = np.linalg.norm(det.centres - ref_det.centres, axis=1)  # NaN where either is missing
    gap = np.where(np.isnan(det.centres[:, 0]) & np.isnan(ref_det.centres[:, 0]), 0.0, gap)  # both: agree
    m = det.matches(caption)
    psnr = lambda x, y: min(PSNR_CAP, float(peak_signal_noise_ratio(x, y, data_range=2.0)))
    pool = lambda x: F.adaptive_avg_pool2d(x, preview_hw or x.shape[-2:])
    return {
        "psnr": psnr(a, b),
        "psnr_lo": psnr(pool(a), pool(b)),
        "ssim": float(structural_similarity_index_measure(a, b, data_range=2.0, kernel_size=7, sigma=1.0)),
        "sharpness": sharpness(video, ref),
        "pos_err": float(np.where(np.isnan(gap), MISSING, gap).mean()),
        **{k: float(v) for k, v in m.items()},
        "all3": float(m["colour"] and m["shape"] and m["direction"]),
        "speed_err": abs(det.speed - ref_det.speed),
        "obj_iou": mask_iou(object_mask(video, ref_det), object_mask(ref, ref_det)),
    }


def score_batch(
    per: dict[str, list[dict]],
    videos: dict[str, torch.Tensor],
    refs: torch.Tensor,
    prompts: list[str],
    preview_hw: tuple[int, int],
    extra: dict[str, dict],
    dilate: int | None = None,
) -> None:
    """Append every method's row of each clip of a batch to per[method].

    videos: method -> (B, 3, F, h, w) decoded clips; refs: the (B, 3, F, H, W) references; extra[method]: fields
    added to each of its rows. With `dilate`, also PSNR inside and outside the reference's object mask grown by
    that many pixels (`psnr_obj`, `psnr_bg`) and the object's share of the pixels (`obj_frac`).
    """
    from surf_train.data.toyworld import detect

    for j, p in enumerate(prompts):
        ref = refs[j]
        ref_det = detect(ref)
        masks = region_masks(ref, ref_det, dilate) if dilate is not None else None
        for m in per:
            v = videos[m][j]
            row = clip_metrics(v, ref, ref_det, p, preview_hw)
            if masks is not None:
                row.update(psnr_obj=masked_psnr(v, ref, masks[0]), psnr_bg=masked_psnr(v, ref, masks[1]))
            row.update(extra[m])
            if masks is not None:
                row["obj_frac"] = float(masks[0].mean())
            per[m].append(row)
