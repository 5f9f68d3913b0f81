import os

import pytest
import torch

from surf_train.data.pairs import PairsConfig, make_pairs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# 2 threads on a quiet 2-core machine; OMP_NUM_THREADS wins when set: with another process on one of the
# cores, 2 threads make the tiny VAE 40x slower (1.34 s vs 0.03 s per 64x64x9 encode, measured)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))

# the marks diffusers' test mixins put on their tests (tests/referee; diffusers registers them in its own
# tests/conftest.py, which is not collected). Registered here: a second conftest.py under tests/ would shadow this
# one for the test modules that `from conftest import ...`.
DIFFUSERS_MARKS = (
    *("training", "attention", "compile", "cache", "memory", "cpu_offload", "group_offload", "lora", "ip_adapter"),
    *("single_file", "quantization", "bitsandbytes", "quanto", "torchao", "gguf", "modelopt", "sdnq", "autoround"),
    *("context_parallel", "tensor_parallel", "big_accelerator", "nightly"),
)


def pytest_configure(config):
    for mark in DIFFUSERS_MARKS:
        config.addinivalue_line("markers", f"{mark}: a diffusers test-mixin mark")


@pytest.fixture(scope="session")
def tiny_wan():
    from surf_train.base import BaseSpec, load_base_model

    return load_base_model(BaseSpec.from_name("tiny"), "cpu")


@pytest.fixture(scope="session")
def tiny_hunyuan():
    from surf_train.base import BaseSpec, load_base_model

    return load_base_model(BaseSpec.from_name("tiny_hunyuan"), "cpu")


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """24 tiny pairs (latent 16x3x8x8 targets) in 6 shards: 5 train, 1 held out for validation."""
    out = tmp_path_factory.mktemp("pairs")
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    make_pairs(
        PairsConfig.from_dict(
            {
                "base": "tiny",
                "out_dir": str(out),
                "height": 64,
                "width": 64,
                "frames": 9,
                "steps": 6,
                "switch": 2,
                "num_pairs": 24,
                "shard_size": 4,
                "rule": "paper",
                "progress": False,
            }
        )
    )
    os.environ.update(env)
    return out


@pytest.fixture
def launched():
    """Processes started by a test; whatever is still alive at the end is killed with its descendants."""
    from procs import kill_tree

    procs = []
    yield procs
    for p in procs:
        kill_tree(p)


# synthetic videos: name -> (frames, height, width, fps); odd sizes are 4:4:4
VIDEOS = {
    "wide.mp4": (48, 96, 160, 24),
    "tall.mp4": (40, 160, 96, 30),
    "square.mp4": (36, 128, 128, 25),
    "sub/odd.mp4": (30, 75, 131, 24),
    "short.mp4": (6, 64, 64, 24),
    "small.mp4": (40, 40, 48, 24),
}
VIDEO_BUCKETS = [[64, 64], [64, 96], [96, 64]]
VIDEO_SMALL = dict(frames=9, buckets=VIDEO_BUCKETS, shard_size=3, progress=False)


@pytest.fixture(scope="session")
def synthetic_videos(tmp_path_factory):
    """A directory of small mp4s with moving shapes: 4 usable (one of odd size), one too short (6 frames),
    one too small (40x48 for 64-pixel buckets), one corrupt (not a video)."""
    from surf_train.data.video import write_synthetic_video

    d = tmp_path_factory.mktemp("videos")
    for i, (name, (f, h, w, fps)) in enumerate(VIDEOS.items()):
        write_synthetic_video(d / name, f, h, w, fps, seed=i)
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    return d


@pytest.fixture(scope="session")
def video_pairs(tmp_path_factory, synthetic_videos):
    """Degrade-mode pairs of the synthetic videos (64-pixel buckets, 9 frames, one clip per video: 4 pairs in
    2 shards), and the run's summary."""
    from surf_train.data.video_pairs import VideoPairsConfig, make_video_pairs

    out = tmp_path_factory.mktemp("video_pairs")
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    summary = make_video_pairs(
        VideoPairsConfig.from_dict(
            {"base": "tiny", "videos": str(synthetic_videos), "out_dir": str(out), **VIDEO_SMALL, "clips_per_video": 1}
        )
    )
    os.environ.update(env)
    return out, summary
