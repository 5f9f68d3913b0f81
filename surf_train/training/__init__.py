"""Training a Refiner: the bridge-flow objective (`objective`), the LightningModule (`module`), the run
itself with resume (`train`), its callbacks, the CPU DeepSpeed strategy, the checkpoint home (`checkpoint`: resume
selection, requeue pruning, reading, atomic writes) and turning a checkpoint into an exported Refiner (`export`).
May import `common`, `base`, `models` and `data`; never inference or evaluation."""
