"""Where the Refiner's super-resolution errors sit in the flat background: by pixel column/row modulo the window.

    python benchmarks/seams.py REFINER [--n 32]

For N toy clips (evaluate --mode sr's clips), the squared error of bilinear and of the Refiner against the native
reference is averaged over background pixels (the reference's dilated object mask removed), by position inside a
Refiner window (window tokens x patch x the VAE stride, in pixels). Window cuts show as error peaks at the cut
positions (0 for plain windows, half a window for shifted ones). Prints both profiles and the ratio of the error
within 1 px of a cut to the rest; writes nothing.
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> None:
    from surf_train.base.sampling import resize_latent
    from surf_train.data.toyworld import detect
    from surf_train.evaluate import EvalConfig
    from surf_train.evaluation.clips import Recorder, batch, native_run, refiner_text, setup
    from surf_train.evaluation.metrics import region_masks
    from surf_train.models.sampler import RefinerSampler, upsample

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("refiner")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--k", type=int, default=None, help="Refiner steps (default: the export's K)")
    a = ap.parse_args(argv)
    cfg = EvalConfig(refiner=a.refiner, n=a.n, mode="sr", batch=16, progress=False)
    st = setup(cfg)
    k = a.k or st.sampler.steps
    ncfg = st.net.cfg
    period = ncfg.window[2] * ncfg.patch_size[2] * st.spec.stride_s  # window width in pixels
    err = {m: np.zeros(period) for m in ("bilinear", "refiner")}
    count = np.zeros(period)
    for i0 in range(0, cfg.n, cfg.batch):
        b = batch(st, i0, cfg.batch, cfg.seed)
        x_ref, _ = native_run(st, Recorder(st.model.velocity_fn(b.cond, cfg.guidance)), b.noise)
        x_lo = resize_latent(x_ref, st.lo, "area")
        x_up = upsample(x_lo, st.hi, "bilinear")
        refined = RefinerSampler(steps=k, up_mode="bilinear").refine(st.net, x_up, text=refiner_text(st.net, b.cond))
        out = {"bilinear": x_up, "refiner": refined}
        ref = st.model.vae_decode(x_ref)
        vids = {m: st.model.vae_decode(v) for m, v in out.items()}
        for j in range(len(b.prompts)):
            bg = region_masks(ref[j], detect(ref[j]), cfg.mask_dilate)[1]  # (F, H, W)
            for m, v in vids.items():
                se = (v[j].clamp(-1, 1) - ref[j].clamp(-1, 1)).pow(2).mean(0).numpy()  # (F, H, W)
                for axis in (1, 2):  # rows and columns
                    pos = np.arange(se.shape[axis]) % period
                    for p in range(period):
                        sel = np.take(se, np.where(pos == p)[0], axis=axis)
                        msk = np.take(bg, np.where(pos == p)[0], axis=axis)
                        err[m][p] += sel[msk].sum()
                        if m == "bilinear":
                            count[p] += msk.sum()
    half = period // 2
    near = np.zeros(period, bool)
    for c in (0, half):
        near[[(c - 1) % period, c % period]] = True  # the two pixels either side of a cut
    print(f"background squared error by position in a {period}-px window (cuts at 0 and {half}), N = {cfg.n}, K = {k}")
    for m, e in err.items():
        prof = e / count
        print(f"{m:>9}: " + " ".join(f"{1e4 * x:5.1f}" for x in prof) + "  (x1e-4)")
        print(f"{'':>9}  at cuts / elsewhere = {prof[near].mean() / prof[~near].mean():.2f}")


if __name__ == "__main__":
    main()
