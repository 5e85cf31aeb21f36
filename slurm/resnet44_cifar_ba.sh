#!/bin/bash
# The paper's CIFAR-10 runs (Hoffer et al., Figures 2-4): ResNet-44 + cutout, B=64, recipe
# pipelines/cifar10_resnet44_ba.toml, as a job array: task i trains with M = the i-th entry of VIEWS_LIST.
#
#   DATA=/data/cifar10/train VAL=/data/cifar10/test sbatch slurm/resnet44_cifar_ba.sh   (Figures 2-3:
#       M = 1 2 4 8 16 32, array 0-5; add EXTRA_ARGS=--log-grad-norm for Figure 2's gradient norms)
#   DATA=... VAL=... FIGURE=4 sbatch --array=0-2 slurm/resnet44_cifar_ba.sh                (Figure 4)
#
# Figure 4 (FIGURE=4) sets VIEWS_LIST="1 10 ra10": the baseline (M=1), BA with M=10, and regime
# adaptation: an entry "raM" trains with --regime ra, i.e. B*M = 640 unique images per step, one view
# each, for M = 10 times the epochs (and the LR decays stretched alike).
#
# Allocation (#SBATCH lines below; override on the sbatch command line):
#   --array=0-5               one task per VIEWS_LIST entry (index = position in the list)
#   --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 (CPU-only: --gpus-per-node=0)
#   --cpus-per-task=8  --time=12:00:00
# Environment overrides (exported by sbatch):
#   VIEWS_LIST="1 2 4 8 16 32"   M per array task; "raM" = regime adaptation with factor M
#   FIGURE=4                     shorthand for VIEWS_LIST="1 10 ra10"
#   RECIPE=pipelines/cifar10_resnet44_ba.toml, DATA, VAL, BATCH (B, default 64), EPOCHS,
#   OUTPUT_ROOT=runs (job folder $OUTPUT_ROOT/<job name>-<array job id>_<task id>), CHECKPOINT_EVERY,
#   EXTRA_ARGS, PYTHON, ENGINE, SRUN_MPI, DALI_BA_ROOT: as in slurm/resnet50_ba.sh
# Each task's folder holds recipe.toml, environment.json, metrics.jsonl, checkpoints/, model.pt and
# job.txt; preempted or timed-out tasks checkpoint, requeue themselves and resume (see resnet50_ba.sh).
#SBATCH --job-name=resnet44_cifar_ba
#SBATCH --array=0-5
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -uo pipefail

RECIPE=${RECIPE:-pipelines/cifar10_resnet44_ba.toml}
if [ "${FIGURE:-}" = 4 ]; then VIEWS_LIST="1 10 ra10"; fi
# shellcheck source=slurm/lib.sh
source "${DALI_BA_ROOT:-$SLURM_SUBMIT_DIR}/slurm/lib.sh" || exit 2

read -r -a runs <<< "${VIEWS_LIST:-1 2 4 8 16 32}"
task=${SLURM_ARRAY_TASK_ID:-0}
[ "$task" -lt "${#runs[@]}" ] || die "array task $task has no entry in VIEWS_LIST=(${runs[*]}): use --array=0-$((${#runs[@]} - 1))"
entry=${runs[$task]}
[[ $entry =~ ^(ra)?([1-9][0-9]*)$ ]] || die "VIEWS_LIST entry '$entry' is neither M nor raM (M a positive integer)"
VIEWS=${BASH_REMATCH[2]}
if [ -n "${BASH_REMATCH[1]}" ]; then REGIME=ra; fi

dali_ba_setup
dali_ba_recipe_args
dali_ba_srun "$PYTHON" -m dali_ba.train "${RECIPE_ARGS[@]}" --output "$JOB_DIR" "${RESUME_ARGS[@]}"
