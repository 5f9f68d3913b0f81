"""The Refiner network and everything needed to run an exported one: shifted-window attention as pure functions
(`windows`), the Refiner's blocks (`blocks`), the Refiner DiT with its config and presets (`refiner`) and loading
an exported Refiner directory (`loading`).
May import `common` and `base`; never data, training, inference or evaluation."""
