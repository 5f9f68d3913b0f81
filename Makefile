# CPU install path: everything pinned by constraints-cpu.txt (torch==2.13.0 is the CPU build on this
# kind of machine; an unpinned torch pulls a multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints-cpu.txt

.PHONY: venv demo test test-fast lint format bench toy-base toy-pairs toy-refiner toy-student clean gpu-wheels \
	gpu-check

$(BIN)/.installed: pyproject.toml setup.py constraints-cpu.txt
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
	$(BIN)/python -m surf_train +experiment=demo
	$(BIN)/python -m surf_train.export runs/demo/checkpoints/last.ckpt runs/demo/refiner
	$(BIN)/python -m surf_train.generate
	$(BIN)/python -m surf_train.evaluate --n 16 --switches 5 --refiner runs/demo/refiner --out-dir outputs/evaluate
	$(BIN)/python -m surf_train.evaluate --mode sr --n 16 --ks 4 --refiner runs/demo/refiner \
		--compare assets/toy_refiner --out-dir outputs/evaluate_sr

# the shipped assets/toy_base, rebuilt (about 2 h 20 min on 2 CPU threads; both stages resume when rerun):
# 16000 steps from random weights, then a warm restart on a fresh 8000-step schedule stopped at step 1688
toy-base: venv
	$(BIN)/python data_prep/train_toy_base.py --out runs/toy_stage1 --work runs/toy_stage1_state
	$(BIN)/python data_prep/train_toy_base.py --init runs/toy_stage1 --steps 8000 --stop-at 1688 \
		--work runs/toy_stage2_state

# the toy Refiner's training pairs: 1024 super-resolution and 1024 generated pairs of the same native clips (a rerun
# resumes, or finds them complete)
toy-pairs: venv
	$(BIN)/python data_prep/make_pairs.py out_dir=runs/toy_refiner/sr_pairs num_pairs=1024 switch=20 seed=100000
	$(BIN)/python data_prep/make_pairs.py out_dir=runs/toy_refiner/gen_pairs num_pairs=1024 seed=100000

# the shipped assets/toy_refiner, rebuilt (about 35 min on 2 CPU threads; every step resumes when rerun): the toy
# pairs, 4000 steps (conf/experiment/toy_refiner.yaml), exported with the K and the start-point noise chosen in
# docs/evaluation.md
TOY_REFINER_K ?= 4
TOY_REFINER_NOISE ?= 0.6
toy-refiner: toy-pairs
	$(BIN)/python -m surf_train +experiment=toy_refiner
	$(BIN)/python -m surf_train.export runs/toy_refiner/train/checkpoints/last.ckpt assets/toy_refiner \
		--steps $(TOY_REFINER_K) --start-noise $(TOY_REFINER_NOISE)

# a 1-step student distilled from assets/toy_refiner (docs/training.md#distilling-a-few-step-student; under 60 min
# on 2 CPU threads, conf/experiment/toy_student.yaml has the arithmetic; every step resumes when rerun): the toy
# pairs, 2500 steps, exported with the K and start noise the run records (the student's 1, the teacher's 0.6)
toy-student: toy-pairs
	$(BIN)/python -m surf_train +experiment=toy_student
	$(BIN)/python -m surf_train.export runs/toy_student/train/checkpoints/last.ckpt assets/toy_student

test: venv lint
	$(BIN)/python -m pytest -q

# ruff (pyproject.toml [tool.ruff]); `make format` rewrites, .pre-commit-config.yaml runs both per commit
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python benchmarks/bench_pairs.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_attention.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_video.py

# GPU check (benchmarks/gpu_check.py): `make gpu-wheels` here (PyPI reachable) downloads into $(WHL)/ the packages the
# GPU machine lacks, at the versions of constraints-cpu.txt, for its CPython 3.12 on manylinux x86_64; antlr4 4.9.3
# is an sdist only (pure Python: built into a wheel here), deepspeed stays an sdist (built there against its torch).
WHL ?= .whl
GPU_PY ?= python3
GPU_SITE ?= /tmp/site
GPU_WHEELS := diffusers hydra-core omegaconf webdataset braceexpand importlib_metadata lazy-importer pydantic \
	pydantic_core annotated-types typing-inspection typing_extensions hjson
GPU_SDISTS := antlr4-python3-runtime deepspeed
PLATFORMS := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64
pinned = $(foreach p,$(1),$(or $(shell grep -i '^$(p)==' constraints-cpu.txt),\
	$(error $(p) is not pinned in constraints-cpu.txt)))

gpu-wheels:
	rm -rf $(WHL) && mkdir -p $(WHL)/sdist
	$(PY) -m pip download -q --no-deps $(PLATFORMS) -d $(WHL) $(call pinned,$(GPU_WHEELS))
	$(PY) -m pip download -q --no-deps --no-binary=:all: -d $(WHL)/sdist $(call pinned,$(GPU_SDISTS))
	$(PY) -m pip wheel -q --no-deps -w $(WHL) $(WHL)/sdist/antlr4*.tar.gz
	mv $(WHL)/sdist/deepspeed-*.tar.gz $(WHL)/ && rm -rf $(WHL)/sdist
	@ls -l $(WHL) | tail -n +2
	@size=$$(du -sm $(WHL) | cut -f1); echo "$(WHL): $$size MB"; test $$size -lt 60

# on the GPU machine, from the repository root with $(WHL)/ carried along (see the docstring of gpu_check.py);
# GPU_CHECK_ARGS="--out-dir DIR --no-compile" skips the compiled-vs-eager cases (on by default)
gpu-check:
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) \
		$(WHL)/*.whl
	DS_BUILD_OPS=0 PYTHONPATH=$(GPU_SITE) $(GPU_PY) -m pip install -q --no-index --no-deps --no-build-isolation \
		--no-compile --no-cache-dir --upgrade --target $(GPU_SITE)_ds $(WHL)/deepspeed-*.tar.gz
	PYTHONPATH=$(GPU_SITE):$(GPU_SITE)_ds:$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) data outputs runs
