#!/bin/bash
# The sweep's program: `wandb agent` runs it inside launch/sweep_agent.sbatch, one trial per job:
#   bash launch/sweep_run.sh +experiment=wan ... model.window.0=2 model.window.1=16 ...   (by the agent)
#   bash launch/sweep_run.sh --resume RUN_DIR                     (by sweep_agent.sbatch after a requeue)
#
# It starts the multi-GPU training of one sweep point with launch/train.sbatch, i.e. one srun over the whole
# allocation: the agent is a single process on the first node, and srun hands this one argument list to
# every rank, so all ranks train the same point. The run directory is named after the agent's W&B run id,
# and that id goes to <run dir>/wandb_id, which surf_train reads, so the training logs into the sweep's run.
# The argument list is saved in <run dir>/overrides: a requeued job resumes the same trial (same
# overrides, run directory, checkpoints and W&B run) instead of asking the agent for a new one.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
sweeps=${SURF_SWEEP_DIR:-runs/sweeps}

if [[ ${1:-} == --resume ]]; then
  run_dir=${2:?usage: sweep_run.sh --resume RUN_DIR}
  mapfile -t args < "$run_dir/overrides"
else
  : "${WANDB_RUN_ID:?sweep_run.sh is started by wandb agent (see launch/sweep_agent.sbatch)}"
  run_dir=$sweeps/${WANDB_SWEEP_ID:-sweep}/$WANDB_RUN_ID
  args=("$@" "name=sweep-$WANDB_RUN_ID")
  # overrides given to sweep_agent.sbatch (one per line) come last, so they win over the sweep's
  if [[ -n ${SURF_SWEEP_EXTRA:-} ]]; then
    mapfile -t extra <<< "$SURF_SWEEP_EXTRA"
    args+=("${extra[@]}")
  fi
  mkdir -p "$run_dir"
  printf '%s\n' "${args[@]}" > "$run_dir/overrides"
  printf '%s\n' "$WANDB_RUN_ID" > "$run_dir/wandb_id"
  if [[ -n ${SLURM_JOB_ID:-} ]]; then  # lets a requeued job (same job id) find its trial
    mkdir -p "$sweeps/jobs"
    printf '%s\n' "$run_dir" > "$sweeps/jobs/$SLURM_JOB_ID"
  fi
fi

RUN_DIR=$run_dir exec bash launch/train.sbatch "${args[@]}"
