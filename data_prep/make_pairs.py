"""Write (preview, target) latent pairs into WebDataset shards. `python data_prep/make_pairs.py --help`.

The same command as the `surf-make-pairs` console script (surf_train/cli.py)."""

from surf_train.cli import make_pairs

if __name__ == "__main__":
    make_pairs()
