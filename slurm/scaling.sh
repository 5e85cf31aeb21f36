#!/bin/bash
# Step-throughput sweep: ranks x M, no full training. For every pair, one srun step runs
# `dali-ba profile step` (STEPS timed steps after WARMUP, rank 0 writes profile_step.json
# into <job folder>/r<ranks>_m<M>/), then `dali-ba profile collect` gathers every pair into
# one table, <job folder>/scaling.md (+ JSON beside it). The paper's Figure 5 point: the time per step
# barely changes with M when the GPUs have compute to spare.
#
#   DATA=/data/imagenet/train sbatch slurm/scaling.sh                       (from the repo root)
#   RANKS_LIST="4 8 16" VIEWS_LIST="1 4 10" sbatch --nodes=4 slurm/scaling.sh
#
# Allocation (#SBATCH lines below; override on the sbatch command line): --nodes=2
# --ntasks-per-node=4 (= GPUs per node) --gpus-per-node=4 (CPU-only: 0) --cpus-per-task=8 --time=01:00:00.
# A sweep point with R ranks uses ceil(R / tasks per node) nodes.
# Environment overrides:
#   RANKS_LIST   rank counts (default: 1, 2, 4, ... up to the allocation's tasks, and that count)
#   VIEWS_LIST="1 2 4 10"   values of M
#   STEPS=50 WARMUP=10      timed steps per point, and untimed steps before them
#   RECIPE=pipelines/imagenet_resnet50_ba.toml, DATA, VAL, BATCH, EXTRA_ARGS, OUTPUT_ROOT (job folder
#   $OUTPUT_ROOT/<job name>-<job id>), PYTHON, ENGINE, SRUN_MPI, DALI_BA_ROOT: as in slurm/resnet50_ba.sh
# A point that fails (e.g. out of memory at a large M) is reported and skipped; the job then exits 1
# after collecting the others.
#SBATCH --job-name=scaling
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

RECIPE=${RECIPE:-pipelines/imagenet_resnet50_ba.toml}
# shellcheck source=slurm/lib.sh
source "${DALI_BA_ROOT:-$SLURM_SUBMIT_DIR}/slurm/lib.sh" || exit 2

dali_ba_setup
dali_ba_recipe_args
tasks=${SLURM_NTASKS:?}
per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}
if [ -z "${RANKS_LIST:-}" ]; then
  RANKS_LIST=""
  for ((r = 1; r < tasks; r *= 2)); do RANKS_LIST+="$r "; done
  RANKS_LIST+=$tasks
fi

failed=()
points=()
for ranks in $RANKS_LIST; do
  [ "$ranks" -le "$tasks" ] || die "RANKS_LIST has $ranks ranks but the allocation has $tasks tasks"
  nodes=$(((ranks + per_node - 1) / per_node))
  for views in ${VIEWS_LIST:-1 2 4 10}; do
    out=$JOB_DIR/r${ranks}_m${views}
    echo "=== $ranks rank(s) on $nodes node(s), M=$views -> $out"
    if dali_ba_srun --nodes="$nodes" --ntasks="$ranks" --ntasks-per-node=$((ranks < per_node ? ranks : per_node)) \
        "$PYTHON" -m dali_ba profile step "${RECIPE_ARGS[@]}" --views "$views" \
        --steps "${STEPS:-50}" --warmup "${WARMUP:-10}" --out "$out"; then
      points+=("$out")
    else
      failed+=("r${ranks}_m${views}")
    fi
  done
done
((${#points[@]})) || die "every sweep point failed: ${failed[*]}"
"$PYTHON" -m dali_ba profile collect "${points[@]}" --out "$JOB_DIR/scaling.md" || exit 1
cat "$JOB_DIR/scaling.md"
if ((${#failed[@]})); then
  echo "scaling: these points failed (see above): ${failed[*]}" >&2
  exit 1
fi
