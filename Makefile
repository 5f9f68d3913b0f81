# CPU install path: everything pinned by constraints-cpu.txt (torch==2.13.0 is the CPU build on this
# kind of machine; an unpinned torch pulls a multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints-cpu.txt

.PHONY: venv demo test test-fast bench toy-base clean

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -q torch==2.13.0 setuptools wheel ninja
	# deepspeed is an sdist whose setup.py imports torch: build it against the torch just installed
	$(PIP) -q --no-build-isolation deepspeed
	$(PIP) -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# the main job end to end on the toy default: pairs -> training -> export -> generation -> evaluation
demo: venv
	$(BIN)/python data_prep/make_pairs.py
	$(BIN)/python -m surf_train
	$(BIN)/python -m surf_train.export runs/tiny/checkpoints/last.ckpt runs/tiny/refiner
	$(BIN)/python -m surf_train.generate
	$(BIN)/python -m surf_train.evaluate --n 16 --switches 5 --out-dir outputs/evaluate

# the shipped assets/toy_base, rebuilt (about 2 h 20 min on 2 CPU threads; both stages resume when rerun):
# 16000 steps from random weights, then a warm restart on a fresh 8000-step schedule stopped at step 1688
toy-base: venv
	$(BIN)/python data_prep/train_toy_base.py --out runs/toy_stage1 --work runs/toy_stage1_state
	$(BIN)/python data_prep/train_toy_base.py --init runs/toy_stage1 --steps 8000 --stop-at 1688 \
		--work runs/toy_stage2_state

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python benchmarks/bench_pairs.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_attention.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_video.py

clean:
	rm -rf $(VENV) data outputs runs
