"""Training data: the one shard schema (`shards`), pairs from the frozen base model (`pairs`) and from real
videos (`video`, `degrade`, `video_pairs`), what a pair records about its base model and run (`meta`), the toy
world that renders clips with exact answers (`toyworld`), and the datamodule that streams shards to training
(`datamodule`) through a stream whose position checkpoints save (`stream`).
May import `common`, `base` and `models`; never training, inference or evaluation."""
