"""Evaluations of previews and the Refiner against the base model's native generation on the toy world: per-clip
metrics (`metrics`), bootstrap intervals and summaries (`stats`), tables, plots and written files (`report`), the
setup every evaluation shares (`clips`: base model, Refiner, prompts, batches, the native run), and the evaluations
themselves: signature fidelity (`fidelity`), super-resolution (`sr`) and SURF with acceleration plug-ins (`accel`).
Their command lines (settings dataclass, main) are surf_train.evaluate and surf_train.evaluate_accel, which share
the parsing and the one-line errors of `command`.
May import `common`, `base`, `models`, `data`, `inference` and `cost`; never training."""
