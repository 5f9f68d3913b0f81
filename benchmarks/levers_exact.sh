#!/usr/bin/env bash
# The table "Exact previews without a projection" of docs/evaluation.md: the exact-preview low-band term
# (module.bridge.exact_low_weight) measured on the pairs of `make toy-refiner` (run `make toy-pairs` first).
# Each Refiner is exported with K = 4 and checked in super-resolution (own sampler, told `exact`) and at the
# default switch, N = 64. Every step resumes when rerun; about 50 min on 2 CPU threads.
#   bash benchmarks/levers_exact.sh            # -> runs/levers_exact/<name>/{sr,surf}/table*.md
set -e
L=runs/levers_exact
PY=${PY:-.venv/bin/python}
check() {  # NAME START_NOISE: export NAME's last checkpoint with that start noise, then both evaluations
  local name=$1 noise=$2 out=$L/$1/s$2
  [ -f $out/refiner/surf.json ] || $PY -m surf_train.export $L/$name/train/checkpoints/last.ckpt $out/refiner \
    --steps 4 --start-noise $noise
  [ -f $out/sr/results_sr.json ] || $PY -m surf_train.evaluate --mode sr --n 64 --ks 4 --refiner $out/refiner \
    --out-dir $out/sr --no-progress
  [ -f $out/surf/results.json ] || $PY -m surf_train.evaluate --n 64 --switches 5 --rules pool \
    --refiner $out/refiner --out-dir $out/surf --no-progress
}
train() {  # NAME [hydra overrides...]: the toy_refiner experiment with the overrides
  local name=$1; shift
  $PY -m surf_train +experiment=toy_refiner logger=none run_dir=$L/$name/train "$@"
}
# the Refiner shipped before the term (bilinear conditioning, no term), from git history
mkdir -p $L/before
[ -f $L/before/refiner/surf.json ] || git archive b4524e9 assets/toy_refiner | tar -x -C $L/before --strip-components 1
[ -d $L/before/refiner ] || mv $L/before/toy_refiner $L/before/refiner
# that Refiner fine-tuned for 1500 steps with the term at three weights
for w in 10 30 100; do
  train ft_w$w init_from=$L/before/refiner module.init_from_wan=null module.bridge.up_mode=bilinear \
    module.bridge.exact_low_weight=$w trainer.max_steps=1500 trainer.val_check_interval=500
  check ft_w$w 0.75
done
[ -f $L/ft_w30/s0.5/results_sr.json ] || $PY -m surf_train.evaluate --mode sr --n 64 --ks 4 --start-noise 0.5 \
  --refiner $L/ft_w30/s0.75/refiner --out-dir $L/ft_w30/s0.5 --no-progress
# from the toy base, 4000 steps: bilinear with the term, and today's recipe (nearest with the term)
train scratch_bilinear module.bridge.up_mode=bilinear
check scratch_bilinear 0.75
[ -f $L/scratch_bilinear/s0.6/results_sr.json ] || $PY -m surf_train.evaluate --mode sr --n 64 --ks 4 \
  --start-noise 0.6 --refiner $L/scratch_bilinear/s0.75/refiner --out-dir $L/scratch_bilinear/s0.6 --no-progress
train shipped
check shipped 0.75
# the start noise of the export, chosen on 32 other clips
for s in 0.55 0.6 0.65; do
  for mode in sr surf; do
    out=$L/shipped/sweep_$mode$s
    [ -f $out/table*.md ] || $PY -m surf_train.evaluate --mode $mode --n 32 --seed 10000 --ks 4 --switches 5 \
      --rules pool --start-noise $s --refiner $L/shipped/s0.75/refiner --out-dir $out --no-progress
  done
done
check shipped 0.6
