"""Real-video pair throughput on CPU: clips/s for decoding (+ crop/resize) and for decoding plus the tiny
VAE encode, decord versus PyAV.

    .venv/bin/python benchmarks/bench_video.py [--videos 4] [--repeats 5] [--out benchmarks/results/video.json]

Synthetic mp4s (moving shapes, libx264 CRF 18, 24 fps) at two source sizes; each video gives
`clips_per_video` clips of 17 frames resampled to 16 fps, read the way make_video_pairs reads them (open
once, clips in order), cropped to the 128x224 bucket and resized. Encode: the tiny Wan VAE on the clip.
Backends interleaved per repeat, medians; torch threads 1. The last section runs make_video_pairs itself
(degrade mode: two VAE encodes, degradations, text, shard writing) for pairs/s.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from surf_train.base import BaseSpec, load_base_model
from surf_train.data.video import Video, clip_indices, clip_starts, crop_box, to_clip, write_synthetic_video
from surf_train.data.video_pairs import VideoPairsConfig, make_video_pairs

BUCKET, FRAMES, FPS, CLIPS = (128, 224), 17, 16.0, 3


def clips_of(path):
    with Video(path, "pyav") as v:
        i = v.info
    box = crop_box(i.height, i.width, BUCKET)
    return [clip_indices(s, i.fps, FRAMES, FPS) for s in clip_starts(i.frames, i.fps, FRAMES, FPS, CLIPS)], box


def run(plan, backend, model=None):
    """(seconds, clips) for every clip of every video: open, read, crop+resize (and encode)."""
    t = time.perf_counter()
    n = 0
    for p, (clips, box) in plan.items():
        with Video(p, backend) as v:
            assert v.backend == backend
            for idx in clips:
                x = to_clip(v.read(idx), box, BUCKET)  # (1, 3, 17, 128, 224)
                if model is not None:
                    model.vae_encode(x * 2 - 1)
                n += 1
    return time.perf_counter() - t, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=4, help="videos per source size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/video.json", help="JSON output (.md next to it)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = load_base_model(BaseSpec.from_name("tiny"), "cpu")
    res = {
        "bucket": list(BUCKET),
        "frames": FRAMES,
        "fps": FPS,
        "clips_per_video": CLIPS,
        "repeats": a.repeats,
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": os.getloadavg()[0],
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as d:
        for name, (f, h, w) in {"480x270": (240, 270, 480), "1280x720": (120, 720, 1280)}.items():
            paths = [write_synthetic_video(Path(d) / name / f"v{i}.mp4", f, h, w, 24, seed=i) for i in range(a.videos)]
            plan = {p: clips_of(p) for p in paths}
            model.vae_encode(torch.zeros(1, 3, FRAMES, *BUCKET))  # warm-up
            rows = {b: {"decode": [], "decode_encode": []} for b in ("decord", "pyav")}
            for _ in range(a.repeats):  # interleaved: load from other processes hits both alike
                for b in rows:
                    rows[b]["decode"].append(run(plan, b))
                    rows[b]["decode_encode"].append(run(plan, b, model))
            out = {
                "source": f"{w}x{h}, {f} frames at 24 fps",
                "videos": a.videos,
                "clips": sum(len(c) for c, _ in plan.values()),
            }
            for b, r in rows.items():
                for k, vals in r.items():
                    sec = statistics.median(s for s, _ in vals)
                    out[f"{b}_{k}_clips_per_s"] = round(vals[0][1] / sec, 2)
            res["sizes"][name] = out
        vids = Path(d) / "480x270"
        c = VideoPairsConfig.from_dict(
            {
                "base": "tiny",
                "videos": str(vids),
                "out_dir": str(Path(d) / "pairs"),
                "frames": FRAMES,
                "buckets": [list(BUCKET)],
                "clips_per_video": CLIPS,
                "progress": False,
                "device": "cpu",
            }
        )
        s = make_video_pairs(c)
        res["make_video_pairs"] = {
            "mode": "degrade",
            "pairs": s["pairs"],
            "pairs_per_s": s["pairs_per_s"],
            "source": "480x270",
            "preview": [64, 112],
        }
    res["load_avg_end"] = os.getloadavg()[0]
    m = res["make_video_pairs"]
    lines = [
        "# Real-video pairs: decode and encode throughput on CPU",
        "",
        f"Clips of {FRAMES} frames resampled to {FPS:g} fps, {CLIPS} per video, cropped and resized to "
        f"{BUCKET[0]}x{BUCKET[1]}; tiny Wan VAE; median of {a.repeats} interleaved repeats; torch threads 1; "
        f"1-min load average {res['load_avg_start']:.1f}-{res['load_avg_end']:.1f} on a shared machine.",
        "",
        "| source | clips | decode, decord | decode, PyAV | decode + VAE, decord | decode + VAE, PyAV |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["sizes"].values():
        lines.append(
            f"| {r['source']} | {r['clips']} | {r['decord_decode_clips_per_s']} | "
            f"{r['pyav_decode_clips_per_s']} | {r['decord_decode_encode_clips_per_s']} | "
            f"{r['pyav_decode_encode_clips_per_s']} |"
        )
    lines += [
        "",
        "Numbers are clips/s (decode = open, read the clip's frames, crop and resize).",
        "",
        f"make_video_pairs, degrade mode, {m['source']} sources (two VAE encodes, degradations, text, shards): "
        f"{m['pairs']} pairs, {m['pairs_per_s']} pairs/s.",
        "",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
