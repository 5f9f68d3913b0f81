#!/bin/bash
# Create the W&B sweep of launch/sweep.yaml and submit one agent job per trial (launch/sweep_agent.sbatch):
#
#   launch/start_sweep.sh data.shards=/data/wan14b_pairs        # key=value: Hydra overrides for every trial
#   SWEEP_ID=ENTITY/PROJECT/ID launch/start_sweep.sh ...          # more agents for an existing sweep
#
# Environment: SWEEP_CONFIG (default launch/sweep.yaml), SWEEP_JOBS (trials; default the grid size),
# SWEEP_PARALLEL (trials at once, default 4), SBATCH_OPTS (more sbatch options, e.g. "--nodes=2 -p gpu").
set -euo pipefail
cd "$(dirname "$0")/.."
config=${SWEEP_CONFIG:-launch/sweep.yaml}
PYTHON=${PYTHON:-python}

if [[ -z ${SWEEP_ID:-} ]]; then
  out=$(wandb sweep "$config" 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$out"
  # "wandb: Run sweep agent with: wandb agent ENTITY/PROJECT/ID" (possibly in colour codes)
  SWEEP_ID=$(grep -o 'wandb agent [[:alnum:]_./-]*' <<< "$out" | tail -n 1 | cut -d' ' -f3 || true)
  [[ -n $SWEEP_ID ]] || { echo "no sweep id in the output of 'wandb sweep $config'" >&2; exit 1; }
fi

if [[ -z ${SWEEP_JOBS:-} ]]; then
  SWEEP_JOBS=$("$PYTHON" - "$config" <<'PY'
import math, sys, yaml
with open(sys.argv[1]) as f:
    params = yaml.safe_load(f)["parameters"]
print(math.prod(len(p["values"]) for p in params.values() if "values" in p))
PY
)
fi

read -r -a opts <<< "${SBATCH_OPTS:-}"
sbatch "${opts[@]}" --array="1-$SWEEP_JOBS%${SWEEP_PARALLEL:-4}" launch/sweep_agent.sbatch "$SWEEP_ID" "$@"
