"""Fast generation: `SurfPipeline`, a diffusers pipeline of a base model's components plus the Refiner
(preview with noise reshifting, refine, decode).
May import `common`, `base` and `models`; never data, training or evaluation."""
