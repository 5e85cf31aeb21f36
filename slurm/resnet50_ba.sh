#!/bin/bash
# The paper's ImageNet run (Hoffer et al., Figures 1 and 5): ResNet-50, B=256 unique images per step
# over all ranks, M=4 augmented views each (M=10: VIEWS=10), recipe pipelines/imagenet_resnet50_ba.toml.
# One task per GPU, started with srun --mpi=pmix; Horovod allreduces over MPI (NCCL on GPUs). With
# ENGINE=torch: plain srun, torch.distributed + DistributedDataParallel (NCCL on GPUs, Gloo on CPU).
#
#   DATA=/data/imagenet/train VAL=/data/imagenet/val sbatch slurm/resnet50_ba.sh        (from the repo root)
#   DATA=... VAL=... VIEWS=10 sbatch --nodes=8 slurm/resnet50_ba.sh
#
# Allocation: the #SBATCH lines below; override any of them on the sbatch command line.
#   --nodes=4                 nodes
#   --ntasks-per-node=4       ranks per node = GPUs per node
#   --gpus-per-node=4         GPUs per node (every rank sees its node's GPUs and takes the one of its
#                             local rank); CPU-only nodes: --gpus-per-node=0
#   --cpus-per-task=8         CPU cores per rank (DALI threads + the Python process)
#   --time=24:00:00           a shorter limit is fine: the job checkpoints and requeues itself
# Environment overrides (exported by sbatch):
#   RECIPE=pipelines/imagenet_resnet50_ba.toml   recipe file (every field can also go in EXTRA_ARGS)
#   DATA, VAL                 training / validation folders (class sub-folders) or .txt lists
#   VIEWS (M, default 4), BATCH (B, global, default 256), EPOCHS (default 90)
#   OUTPUT_ROOT=runs          job folder: $OUTPUT_ROOT/<job name>-<job id>
#   CHECKPOINT_EVERY=1000     steps between checkpoints (besides epoch ends and the stop signal)
#   EXTRA_ARGS                more training flags, e.g. "--amp bf16 --chunks 2 --dali-threads 6"
#   PYTHON                    interpreter (default: <repo>/.venv/bin/python, else python3)
#   ENGINE=horovod            gradient averaging: horovod (srun --mpi=$SRUN_MPI) or torch (srun
#                             --mpi=none; rendezvous at the first node, port 29500 + (job + step id) mod 2000,
#                             or MASTER_ADDR / MASTER_PORT)
#   SRUN_MPI=pmix             srun's --mpi plugin for Horovod (srun --mpi=list shows yours)
#   DALI_BA_ROOT              the repository, if sbatch is not run from its root
# Job folder: recipe.toml (resolved), environment.json (nodes, ranks, GPUs, versions), metrics.jsonl
# (start/step/epoch/stop/summary records; per-step phase timing), checkpoints/, model.pt, job.txt
# (SLURM's view of each start). SLURM writes stdout/stderr to <job name>-<job id>.out in the submit dir.
# Preemption and time limit: SLURM sends USR1 300 s before the limit (B: to this batch shell), which
# forwards it to the ranks; they finish the step, rank 0 checkpoints, training exits 75, and the job
# requeues itself; the next start resumes from the newest checkpoint (same job id and folder).
#SBATCH --job-name=resnet50_ba
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

RECIPE=${RECIPE:-pipelines/imagenet_resnet50_ba.toml}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY-1000}
# shellcheck source=slurm/lib.sh
source "${DALI_BA_ROOT:-$SLURM_SUBMIT_DIR}/slurm/lib.sh" || exit 2

dali_ba_setup
dali_ba_recipe_args
dali_ba_srun "$PYTHON" -m dali_ba.train "${RECIPE_ARGS[@]}" --output "$JOB_DIR" "${RESUME_ARGS[@]}"
