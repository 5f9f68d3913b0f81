import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VIDEO_SMALL, VIDEOS

from surf_train.base.sampling import euler_schedule, resize_latent
from surf_train.common.errors import ConfigError
from surf_train.data import video as video_mod
from surf_train.data.degrade import DegradeConfig, degrade_pixels, sample_params
from surf_train.data.shards import OutDirLock, list_shards, lock_path, read_shards, shard_keys
from surf_train.data.video import (
    Video,
    VideoError,
    clip_indices,
    clip_span,
    clip_starts,
    crop_box,
    list_videos,
    pick_bucket,
    to_clip,
)
from surf_train.data.video_pairs import Bucket, VideoPairsConfig, make_video_pairs, plan_video

ROOT = Path(__file__).resolve().parents[1]
USABLE = ["square.mp4", "sub/odd.mp4", "tall.mp4", "wide.mp4"]


def cfg(out, videos, **kw):
    return VideoPairsConfig.from_dict({"base": "tiny", "videos": str(videos), "out_dir": str(out), **VIDEO_SMALL, **kw})


def samples(out):
    return list(read_shards(list_shards(out)))


def subset(videos, d, *names):
    """A directory of links to some of the synthetic videos (fewer clips: faster runs)."""
    for n in names:
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        (d / n).symlink_to(videos / n)
    return d


@pytest.fixture(autouse=True)
def _single_rank(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)


# --- reading -------------------------------------------------------------------------------------


def test_decord_and_pyav_give_the_same_frames(synthetic_videos):
    c = cfg("unused", synthetic_videos).resolved()
    assert c.buckets[1] == Bucket(64, 96, 32, 48) and c.resolved().buckets == c.buckets
    for name in USABLE:
        path = synthetic_videos / name
        with Video(path, "decord") as d, Video(path, "pyav") as a:
            assert d.backend == "decord" and a.backend == "pyav"
            f, h, w, fps = VIDEOS[name]
            assert d.info == a.info == video_mod.VideoInfo(f, float(fps), h, w)
            clips, _, _ = plan_video(video_mod.VideoEntry(path, name), d.info, c)
            assert len(clips) == 2  # clips_per_video=2: every usable video is long enough for 2
            # clips in reverse order: PyAV has to reopen and decode from the start again
            for clip in reversed(clips):
                fd, fa = d.read(clip.indices), a.read(clip.indices)
                assert fd.shape == (9, h, w, 3) and fd.dtype == np.uint8
                assert np.array_equal(fd, fa), name
            assert fd.std() > 20  # real picture content, not a blank frame


def test_auto_falls_back_to_pyav(synthetic_videos, monkeypatch, caplog):
    path = synthetic_videos / "wide.mp4"
    want = Video(path, "pyav").read([0, 5, 47])

    def broken(self, *a):
        raise RuntimeError("decord exploded")

    monkeypatch.setattr(video_mod._Decord, "read", broken)
    v = Video(path)  # opens with decord, fails on reading, continues with PyAV
    assert v.backend == "decord"
    with caplog.at_level(logging.INFO, logger="surf_train.data.video"):
        assert np.array_equal(v.read([0, 5, 47]), want)
    assert v.backend == "pyav" and "decord failed on frames 0-47; reading with PyAV" in caplog.text
    with pytest.raises(VideoError, match="wide.mp4: decord cannot decode frames 0-47 .*decord exploded"):
        Video(path, "decord").read([0, 5, 47])
    monkeypatch.setitem(sys.modules, "decord", None)  # decord not installed
    v = Video(path)
    assert v.backend == "pyav" and np.array_equal(v.read([0, 5, 47]), want)
    with pytest.raises(VideoError, match=r"corrupt.mp4: cannot open \(decord: .*; pyav: "):
        Video(synthetic_videos / "corrupt.mp4")


def test_truncated_video_fails_per_clip(synthetic_videos, tmp_path):
    """A file cut in half (index at the front) opens, but frames past the cut cannot be decoded."""
    import av

    full = tmp_path / "full.mp4"
    with av.open(str(full), "w", options={"movflags": "faststart"}) as c:
        st = c.add_stream("libx264", rate=24)
        st.width, st.height, st.pix_fmt = 64, 64, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(40):  # noise does not compress: the cut lands in the middle of the frames
            for pk in st.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 64, 3), np.uint8), "rgb24")):
                c.mux(pk)
        for pk in st.encode():
            c.mux(pk)
    data = full.read_bytes()
    cut = tmp_path / "cut" / "cut.mp4"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    v = Video(cut)
    assert v.info.frames == 40
    assert v.read(list(range(5))).shape == (5, 64, 64, 3)
    with pytest.raises(VideoError, match="cut.mp4: pyav cannot decode frames 30-39"):
        v.read(list(range(30, 40)))
    s = make_video_pairs(cfg(tmp_path / "out", cut.parent, buckets=[[64, 64]]))
    assert s["clips"] == 2 and s["clips_failed"] == 1 and s["pairs"] == 1


def test_list_videos_dir_txt_csv(synthetic_videos, tmp_path):
    ids = [e.id for e in list_videos(str(synthetic_videos))]
    assert ids == sorted(["corrupt.mp4", "short.mp4", "small.mp4", *USABLE])
    (tmp_path / "list.txt").write_text(f"{synthetic_videos}/wide.mp4\n\n# comment\n{synthetic_videos}/tall.mp4\n")
    assert [e.path.name for e in list_videos(str(tmp_path / "list.txt"))] == ["tall.mp4", "wide.mp4"]
    (tmp_path / "list.csv").write_text(f"path,text\n{synthetic_videos}/wide.mp4,a red ball\n")
    (e,) = list_videos(str(tmp_path / "list.csv"), caption_column="text")
    assert e.caption == "a red ball" and e.path == synthetic_videos / "wide.mp4"
    (tmp_path / "bad.csv").write_text("file,caption\nx.mp4,y\n")
    with pytest.raises(ConfigError, match="bad.csv: needs a header with a 'path' column"):
        list_videos(str(tmp_path / "bad.csv"))
    with pytest.raises(ConfigError, match="videos=/nope: no such directory or file"):
        list_videos("/nope")


# --- clip sampling -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src_frames,src_fps,clips",
    [(48, 24.0, 3), (40, 30.0, 2), (100, 16.0, 11), (10, 12.0, 1), (12, 24.0, 0), (300, 29.97, 5)],
)
def test_clip_counts_and_resampled_indices(src_frames, src_fps, clips):
    frames, fps = 9, 16.0
    span = clip_span(src_fps, frames, fps)
    starts = clip_starts(src_frames, src_fps, frames, fps, max_clips=5)
    assert len(starts) == min(5, src_frames // span) == min(5, clips)
    ends = []
    for s in starts:
        idx = clip_indices(s, src_fps, frames, fps)
        assert len(idx) == frames and idx[0] == s and idx[-1] == s + span - 1 < src_frames
        assert all(b >= a for a, b in zip(idx, idx[1:]))
        # each index is the source frame nearest to the clip frame's time
        assert all(abs(i - s - j * src_fps / fps) <= 0.5 for j, i in enumerate(idx))
        ends.append(idx[-1])
    assert all(e < s for e, s in zip(ends, starts[1:]))  # clips never overlap
    if src_fps < fps:
        assert len(set(clip_indices(0, src_fps, frames, fps))) < frames  # slower sources repeat frames


def test_buckets_and_crops():
    buckets = [(64, 64), (64, 96), (96, 64)]
    assert pick_bucket(75, 131, buckets) == (64, 96)
    assert pick_bucket(160, 96, buckets) == (96, 64)
    assert pick_bucket(40, 48, buckets) == (64, 64)
    assert crop_box(75, 131, (64, 96)) == (0, 9, 75, 112)  # full height, centred 112 of 131 columns
    assert crop_box(160, 96, (96, 64)) == (8, 0, 144, 96)
    import random

    boxes = {crop_box(75, 131, (64, 96), "random", random.Random(i)) for i in range(20)}
    assert len(boxes) > 3 and all(b[2:] == (75, 112) and 0 <= b[1] <= 19 for b in boxes)
    frames = np.zeros((2, 75, 131, 3), np.uint8)
    frames[:, :, 9:121] = 255  # exactly the centred crop is white
    clip = to_clip(frames, (0, 9, 75, 112), (64, 96))
    assert clip.shape == (1, 3, 2, 64, 96) and torch.allclose(clip, torch.ones_like(clip))


# --- pairs ---------------------------------------------------------------------------------------


def test_degrade_pairs_counts_shapes_metadata_and_skips(video_pairs, synthetic_videos, tiny_wan, caplog):
    out, s = video_pairs
    assert s["videos"] == 7 and s["videos_skipped"] == {"too_short": 1, "too_small": 1, "unreadable": 1}
    assert s["clips"] == s["pairs"] == 4 and s["clips_failed"] == 0 and s["shards"] == 2
    got = samples(out)
    assert len(got) == 4 and len({x["key"] for x in got}) == 4
    assert sorted(x["meta"]["video"]["id"] for x in got) == USABLE
    latent_hw = {"wide.mp4": (8, 12), "sub/odd.mp4": (8, 12), "tall.mp4": (12, 8), "square.mp4": (8, 8)}
    for x in got:
        m = x["meta"]
        h, w = latent_hw[m["video"]["id"]]
        assert x["target"].shape == (16, 3, h, w) and x["preview"].shape == (16, 3, h // 2, w // 2)
        assert x["text"].shape == (m["text_length"], 32) and m["text_length"] <= 16  # at its real length
        assert x["target"].dtype == torch.float16
        assert m["source"] == "video" and m["preview_mode"] == "degrade" and m["fps"] == 16.0
        assert m["target_size"] == [9, 8 * h, 8 * w] and m["preview_size"] == [9, 4 * h, 4 * w]
        assert set(m["degradation"]) == {
            "blur_sigma",
            "down",
            "noise_std",
            "jpeg_quality",
            "latent_blur",
            "latent_noise",
        }
        v = m["video"]
        assert v["backend"] == "decord" and v["path"].endswith(v["id"]) and v["frames"] == VIDEOS[v["id"]][0]
        assert set(v) >= {"fps", "size", "clip", "first_frame", "last_frame", "crop"}
        assert m["base"]["id"] == "tiny:tiny" and m["version"] and m["seed"] == 0
    # the target is the VAE latent of exactly the clip the metadata describes
    m = got[0]["meta"]["video"]
    idx = clip_indices(m["first_frame"], m["fps"], 9, 16.0)
    assert idx[-1] == m["last_frame"]
    frames = Video(synthetic_videos / m["id"], "pyav").read(idx)
    shape = got[0]["target"].shape
    want = tiny_wan.vae_encode(to_clip(frames, tuple(m["crop"]), (8 * shape[2], 8 * shape[3])) * 2 - 1)[0]
    assert torch.allclose(got[0]["target"].float(), want, atol=2e-2)


def test_skipped_videos_are_logged_and_counted(synthetic_videos, tmp_path, caplog):
    videos = subset(synthetic_videos, tmp_path / "v", "short.mp4", "small.mp4", "corrupt.mp4", "square.mp4")
    with caplog.at_level(logging.INFO, logger="surf_train.data.video_pairs"):
        s = make_video_pairs(cfg(tmp_path / "out", videos, clips_per_video=1))
    assert s["pairs"] == 1 and s["videos_skipped"] == {"too_short": 1, "too_small": 1, "unreadable": 1}
    text = caplog.text
    assert "skipped video short.mp4: too short (6 frames at 24 fps; a 9-frame clip at 16 fps needs 13)" in text
    assert "skipped video small.mp4: too small (40x48, bucket 64x64 needs x1.60 upscaling > max_upscale=1)" in text
    assert "skipped video corrupt.mp4: unreadable (" in text and "corrupt.mp4: cannot open" in text
    assert "4 videos, 3 skipped (1 too short, 1 too small, 1 unreadable); 1 clips, 0 failed to decode" in text
    # allowing upscaling brings the small video in
    small = subset(synthetic_videos, tmp_path / "small", "small.mp4")
    s = make_video_pairs(cfg(tmp_path / "up", small, clips_per_video=1, max_upscale=2.0))
    assert s["pairs"] == 1 and s["videos_skipped"]["too_small"] == 0


def test_degradations_are_seeded_and_do_what_they_say():
    c = DegradeConfig()
    draw = [sample_params(c, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert draw[0] == draw[1] != draw[2]
    video = torch.rand(1, 3, 5, 32, 48)
    p = {**draw[0], "blur_sigma": 1.0, "noise_std": 0.02, "jpeg_quality": 50}
    a, b = (degrade_pixels(video, (16, 24), p, torch.Generator().manual_seed(0)) for _ in range(2))
    other = degrade_pixels(video, (16, 24), p, torch.Generator().manual_seed(1))
    assert a.shape == (1, 3, 5, 16, 24) and torch.equal(a, b) and not torch.equal(a, other)
    # with every degradation off the chain is a plain resize; each one alone changes the result
    off = {"blur_sigma": 0.0, "down": "area", "noise_std": 0.0, "jpeg_quality": None}
    plain = degrade_pixels(video, (16, 24), off, torch.Generator())
    assert torch.allclose(plain, resize_latent(video, (16, 24), "area").clamp(0, 1))
    for k, v in (("blur_sigma", 2.0), ("noise_std", 0.05), ("jpeg_quality", 30), ("down", "bicubic")):
        d = degrade_pixels(video, (16, 24), {**off, k: v}, torch.Generator().manual_seed(0))
        assert 1e-3 < (d - plain).abs().mean() < 0.3, k
    # the ranges bound the draws
    tight = DegradeConfig.from_dict(
        {
            "blur_prob": 1,
            "blur_sigma": [1.5, 1.5],
            "jpeg_prob": 0,
            "noise_prob": 1,
            "noise_std": [0.01, 0.02],
            "down_modes": ["bilinear"],
        }
    )
    for s in range(20):
        q = sample_params(tight, torch.Generator().manual_seed(s))
        assert q["blur_sigma"] == 1.5 and q["jpeg_quality"] is None and 0.01 <= q["noise_std"] <= 0.02
        assert q["down"] == "bilinear"
    with pytest.raises(ConfigError, match=r"degrade.noise_std=\[0.5, 0.1\] must be \[low, high\]"):
        DegradeConfig.from_dict({"noise_std": [0.5, 0.1]})
    with pytest.raises(ConfigError, match=r"degrade: unknown settings \['blurr'\]"):
        DegradeConfig.from_dict({"blurr": 1})


def test_degrade_pairs_are_reproducible_under_the_seed(synthetic_videos, tmp_path):
    (tmp_path / "one.txt").write_text(f"{synthetic_videos}/wide.mp4\n")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_video_pairs(cfg(tmp_path / name, tmp_path / "one.txt", seed=seed, clips_per_video=1))
        runs[name] = {x["key"]: x for x in samples(tmp_path / name)}
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.keys() == b.keys() == c.keys() and len(a) == 1
    for k in a:
        assert torch.equal(a[k]["preview"], b[k]["preview"]) and a[k]["meta"] == b[k]["meta"]
        assert torch.equal(a[k]["target"], c[k]["target"])  # the target does not depend on the seed
        assert not torch.equal(a[k]["preview"], c[k]["preview"])
        assert a[k]["meta"]["degradation"] != c[k]["meta"]["degradation"]


def test_repreview_pairs(synthetic_videos, tmp_path):
    (tmp_path / "two.csv").write_text(
        f"path,caption\n{synthetic_videos}/square.mp4,a red ball rolling\n{synthetic_videos}/wide.mp4,\n"
    )
    s = make_video_pairs(
        cfg(
            tmp_path / "r",
            tmp_path / "two.csv",
            mode="repreview",
            clips_per_video=1,
            repreview={"steps": 4, "switch": 1, "rule": "snr"},
        )
    )
    assert s["pairs"] == 2
    got = {x["meta"]["video"]["id"].rsplit("/", 1)[-1]: x for x in samples(tmp_path / "r")}
    sq, wide = got["square.mp4"], got["wide.mp4"]
    for x in (sq, wide):
        m = x["meta"]
        assert m["preview_mode"] == "repreview" and "degradation" not in m
        assert m["schedule"] == {
            "steps": 4,
            "shift": 3.0,
            "guidance": 5.0,
            "scheduler": "FlowMatchEulerDiscreteScheduler",
        }
        assert m["reshift"]["rule"] == "snr" and m["reshift"]["switch"] == 1
        assert m["reshift"]["sigma_switch"] == pytest.approx(float(euler_schedule(4, 3.0).sigmas[1]))
        assert torch.isfinite(x["preview"].float()).all() and x["preview"].shape[2:] == (
            x["target"].shape[2] // 2,
            x["target"].shape[3] // 2,
        )
    assert sq["meta"]["prompt"] == sq["meta"]["caption"] == "a red ball rolling"
    assert wide["meta"]["prompt"] == "" and not torch.equal(sq["text"], wide["text"])
    # switching at the last step leaves nothing to denoise: the preview is the downsampled real latent
    (tmp_path / "one.txt").write_text(f"{synthetic_videos}/square.mp4\n")
    s = make_video_pairs(
        cfg(
            tmp_path / "end",
            tmp_path / "one.txt",
            mode="repreview",
            clips_per_video=1,
            dtype="float32",
            repreview={"steps": 4, "switch": 4},
        )
    )
    assert s["pairs"] == 1
    for x in samples(tmp_path / "end"):
        t = x["target"][None]
        assert torch.allclose(x["preview"], resize_latent(t, tuple(x["preview"].shape[-2:]), "area")[0], atol=1e-5)


def test_resume_and_ranks(synthetic_videos, tmp_path, monkeypatch):
    videos = subset(
        synthetic_videos, tmp_path / "v", "corrupt.mp4", "short.mp4", "square.mp4", "sub/odd.mp4", "wide.mp4"
    )
    out, c = tmp_path / "out", dict(clips_per_video=1, shard_size=1)
    per_rank = []
    for rank in (0, 1):  # the two ranks of a 2-process job, one after the other
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        monkeypatch.setenv("SLURM_NTASKS", "2")
        per_rank.append(make_video_pairs(cfg(out, videos, **c)))
    # sorted videos alternate between ranks: rank 0 corrupt, square, wide; rank 1 short, odd
    assert [r["videos"] for r in per_rank] == [3, 2] and [r["pairs"] for r in per_rank] == [2, 1]
    assert per_rank[0]["videos_skipped"] == {"too_short": 0, "too_small": 0, "unreadable": 1}
    assert per_rank[1]["videos_skipped"] == {"too_short": 1, "too_small": 0, "unreadable": 0}
    by_rank = {
        r: sorted(
            x["meta"]["video"]["id"]
            for x in samples(out)
            if x["key"] in {k for p in out.glob(f"video-r{r:03d}-*.tar") for k in shard_keys(p)}
        )
        for r in (0, 1)
    }
    assert by_rank == {0: ["square.mp4", "wide.mp4"], 1: ["sub/odd.mp4"]}
    keys = [x["key"] for x in samples(out)]
    assert len(keys) == 3 == len(set(keys))
    # one process, rerun: everything is done
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.delenv("SLURM_NTASKS")
    again = make_video_pairs(cfg(out, videos, **c))
    assert again["pairs"] == 0 and again["skipped"] == 3
    # a crash's leftovers: a lost shard is remade, a temporary file is removed, nothing is duplicated
    lost = list_shards(out)[0]
    lost_keys = set(shard_keys(lost))
    lost.unlink()
    (out / "video-r000-000077.tar.tmp").write_bytes(b"half a shard")
    redo = make_video_pairs(cfg(out, videos, **c))
    assert redo["pairs"] == len(lost_keys) == 1 and redo["skipped"] == 2 and not list(out.glob("*.tmp"))
    assert sorted(x["key"] for x in samples(out)) == sorted(keys)
    with pytest.raises(ConfigError, match=r"different configuration \(.*frames: 9 -> 13"):
        make_video_pairs(cfg(out, videos, **c, frames=13))


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(frames=8), "buckets\\[0\\] target frames=8 must be 4\\*n\\+1"),
        (dict(buckets=[[64, 60]]), "buckets\\[0\\] target width=60 must be a positive multiple of 16"),
        (dict(buckets=[[64, 64, 32, 24]]), "buckets\\[0\\] preview width=24"),
        (dict(buckets=[[64]]), "buckets\\[0\\]=\\[64\\]: give \\[height, width\\]"),
        (dict(mode="upscale"), "mode='upscale' must be one of"),
        (dict(backend="opencv"), "backend='opencv' must be one of"),
        (dict(repreview={"switch": 9, "steps": 4}), "repreview.switch=9 must be in \\[0, steps=4\\]"),
        (dict(videos="/nope/videos"), "videos=/nope/videos: no such directory or file"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        make_video_pairs(cfg(tmp_path, kw.pop("videos", tmp_path), **kw))


@pytest.mark.slow
def test_cli_help_demo_and_error(tmp_path):
    script = str(ROOT / "data_prep/make_video_pairs.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "make_video_pairs: write (preview, target)" in r.stdout
    assert "repreview" in r.stdout and "clips_per_video: 2" in r.stdout
    demo = [
        sys.executable,
        script,
        "base=tiny",
        f"out_dir={tmp_path}",
        "frames=9",
        "buckets=[[64,64]]",
        "clips_per_video=1",
        "demo_videos=2",
        "progress=false",
    ]
    r = subprocess.run(
        [*demo, "mode=nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "mode='nope' must be one of" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    # no videos given: the synthetic demo
    r = subprocess.run(
        demo,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "demo_videos").glob("*.mp4"))) == 2 and len(samples(tmp_path)) == 2


def test_out_dir_file_and_double_launch_are_one_clear_error(synthetic_videos, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=f"out_dir={f} is an existing file, not a directory"):
        make_video_pairs(cfg(f, synthetic_videos))
    r = subprocess.run(
        [sys.executable, str(ROOT / "data_prep/make_video_pairs.py"), "base=tiny", f"out_dir={f}"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"make_video_pairs: error: out_dir={f} is an existing file, not a directory"
    )
    out = tmp_path / "out"
    with OutDirLock(out, 0):  # another make_video_pairs of rank 0 is writing there
        with pytest.raises(ConfigError, match=f"{lock_path(out, 0)}: rank 0 of {out} is being written by pid"):
            make_video_pairs(VideoPairsConfig.from_dict({"base": "tiny", "out_dir": str(out), **VIDEO_SMALL}))
    assert not list_shards(out) and not (out / "demo_videos").exists()


def test_repreview_pairs_of_two_experts_record_the_preview_experts(synthetic_videos, tmp_path):
    """Re-previewed by a Wan 2.2 A14B-style base, a pair records the boundary, both guidances and which expert ran
    each preview step (only the preview branch runs: no prefix or target counts)."""
    subset(synthetic_videos, tmp_path / "v", "square.mp4")
    r = {"steps": 6, "switch": 1, "rule": "pool"}
    make_video_pairs(
        cfg(tmp_path / "r", tmp_path / "v", base="tiny_wan22", mode="repreview", clips_per_video=1, repreview=r)
    )
    (x,) = samples(tmp_path / "r")
    experts = x["meta"]["schedule"]["experts"]
    assert experts["boundary"] == 0.875 and experts["guidance"] == {"transformer": 4.0, "transformer_2": 3.0}
    assert set(experts) == {"boundary", "guidance", "preview"} and sum(experts["preview"].values()) == 5


def test_a_directory_of_only_unusable_videos_is_an_error(synthetic_videos, tmp_path):
    """Only unreadable (or too short) videos: one error saying why, not a run that exits 0 with 0 pairs."""
    videos = subset(synthetic_videos, tmp_path / "v", "corrupt.mp4", "short.mp4")
    with pytest.raises(ConfigError, match=r"none of the 2 videos of rank 0 gives a clip \(1 too short, .*1 unreadable"):
        make_video_pairs(cfg(tmp_path / "out", videos, clips_per_video=1))
