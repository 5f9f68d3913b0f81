"""Fast generation: `SurfPipeline`, a diffusers pipeline of a base model's components plus the Refiner
(preview with noise reshifting, refine, decode; `pipeline`), its sizes and plan (`plan`), its timing (`clock`) and
the diffusers conventions it follows beyond the maths (`conventions`).
May import `common`, `base` and `models`; never data, training or evaluation."""
