#!/usr/bin/env bash
# The lever table of docs/evaluation.md ("The shipped toy Refiner"): 1500-step trainings on the super-resolution
# pairs of `make toy-refiner` (run its first make_pairs line first), each exported and checked with
# `evaluate --mode sr --n 32`. Every step resumes when rerun. About 8 min per lever on 2 CPU threads.
#   bash benchmarks/levers_toy_refiner.sh            # -> runs/levers/<lever>/eval_sr/table_sr.md
set -e
L=runs/levers
PY=${PY:-.venv/bin/python}
lever() {  # NAME [hydra overrides...]
  local name=$1; shift
  $PY -m surf_train data.shards=runs/toy_refiner/sr_pairs logger=none trainer.max_steps=1500 \
    trainer.val_check_interval=500 ckpt_every=250 module.decode_base=null data.val_samples=16 \
    model.dim=128 model.depth=4 model.heads=4 model.mlp_ratio=4.0 module.init_from_wan=assets/toy_base/transformer \
    module.optim.lr=3e-4 data.batch_size=8 run_dir=$L/$name hydra.run.dir=$L/$name/h "$@"
  $PY -m surf_train.export $L/$name/checkpoints/last.ckpt $L/$name/refiner
  [ -f $L/$name/eval_sr/results_sr.json ] || $PY -m surf_train.evaluate --mode sr --refiner $L/$name/refiner \
    --n 32 --out-dir $L/$name/eval_sr --no-progress
}
lever A_tiny model.dim=64 model.mlp_ratio=2.0 module.init_from_wan=null module.optim.lr=1e-3
lever B_win4
lever C_conv model.ffn_conv=3
lever D_win8 'model.window=[2,8,8]'
lever E_sig1 model.ffn_conv=3 module.bridge.sigma_aug_max=1.0
lever F_detail model.ffn_conv=3 module.bridge.sigma_aug_max=1.0 module.bridge.noise_space=detail
# E and F sampled from a noisy start, and F with the output projected onto the preview (--consistency on)
for r in E_sig1 F_detail; do
  for s in 0.5 1.0; do
    [ -f $L/$r.s$s/results_sr.json ] || $PY -m surf_train.evaluate --mode sr --refiner $L/$r/refiner --n 32 \
      --start-noise $s --out-dir $L/$r.s$s --no-progress
  done
done
[ -f $L/F_detail.s0.5_on/results_sr.json ] || $PY -m surf_train.evaluate --mode sr --refiner $L/F_detail/refiner \
  --n 32 --start-noise 0.5 --consistency on --out-dir $L/F_detail.s0.5_on --no-progress
# start-point noise at sampling, B's weights
for s in 0.25 0.5; do
  [ -f $L/B_sig$s.eval/results_sr.json ] || $PY -m surf_train.evaluate --mode sr --refiner $L/B_win4/refiner --n 32 \
    --start-noise $s --out-dir $L/B_sig$s.eval --no-progress
done
