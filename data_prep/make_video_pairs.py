"""Write (preview, target) latent pairs from real videos. `python data_prep/make_video_pairs.py --help`.

The same command as the `surf-make-video-pairs` console script (surf_train/cli.py)."""

from surf_train.cli import make_video_pairs

if __name__ == "__main__":
    make_video_pairs()
