# shellcheck shell=bash
# Shared by the batch templates in slurm/ (sourced, never submitted). It
#   - moves to the repository (DALI_BA_ROOT, default: where sbatch was run) so relative paths in
#     recipes and OUTPUT_ROOT resolve there, and picks the Python (PYTHON, else <repo>/.venv, else python3);
#   - names the job folder ${OUTPUT_ROOT:-runs}/<job name>-<job id> (array task: <array id>_<task id>),
#     the same after a requeue, and appends the job's SLURM picture to <job folder>/job.txt;
#   - picks the engine (ENGINE=horovod, the default: srun --mpi=$SRUN_MPI and Horovod over MPI;
#     ENGINE=torch: srun --mpi=none, torch.distributed with its rendezvous from the SLURM variables);
#   - runs one srun step in the background so that the batch shell can pass SLURM's warning signal
#     (--signal=B:USR1@<grace>) or a SIGTERM sent to it on to the step, and requeues the job when training exits 75
#     ("stopped on a signal after a checkpoint"); the requeued job resumes with --resume auto;
#   - requeues it too when training exits 76 (a rank stalled for --stall-timeout: dali_ba/training/stall.py),
#     at most MAX_STALL_REQUEUES times (default 2): a stall that comes back (a node that hangs every time,
#     a file the file system never returns) then ends the job.

EXIT_RESUMABLE=75
EXIT_STALLED=76

die() { echo "$(basename "${SLURM_JOB_NAME:-dali-ba}"): error: $*" >&2; exit 2; }

# dali_ba_setup: cd to the repo, set PYTHON, JOB_DIR and RESUME_ARGS, write job.txt.
dali_ba_setup() {
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit with sbatch"
  cd "${DALI_BA_ROOT:-$SLURM_SUBMIT_DIR}" || die "cannot enter the repository ${DALI_BA_ROOT:-$SLURM_SUBMIT_DIR}"
  [ -d dali_ba ] || die "$PWD is not the dali-ba repository: submit from its root or set DALI_BA_ROOT"
  if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
  fi
  local id=$SLURM_JOB_ID
  [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  JOB_DIR=${OUTPUT_ROOT:-runs}/${SLURM_JOB_NAME}-$id
  mkdir -p "$JOB_DIR" || die "cannot create the job folder $JOB_DIR"
  # shellcheck disable=SC2034  # RESUME_ARGS is for the templates
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then RESUME_ARGS=(--resume auto); else RESUME_ARGS=(); fi
  {
    echo "=== $(date -Is) start ${SLURM_RESTART_COUNT:-0} of job $SLURM_JOB_ID on $(hostname -s)"
    echo "nodes: $(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd ' ')"
    echo "tasks: ${SLURM_NTASKS:-?} (per node ${SLURM_TASKS_PER_NODE:-?}), cpus per task ${SLURM_CPUS_PER_TASK:-?}," \
         "gpus per node ${SLURM_GPUS_PER_NODE:-none}"
    echo "srun: $(srun --version)  python: $PYTHON ($("$PYTHON" --version 2>&1))"
    scontrol show job "$SLURM_JOB_ID"
  } >> "$JOB_DIR/job.txt"
  echo "job folder: $JOB_DIR (start ${SLURM_RESTART_COUNT:-0})"
}

# dali_ba_recipe_args: the training flags from the environment overrides -> array RECIPE_ARGS.
dali_ba_recipe_args() {
  RECIPE_ARGS=(--recipe "$RECIPE")
  [ -f "$RECIPE" ] || die "RECIPE=$RECIPE: no such recipe file"
  case "${ENGINE:=horovod}" in
    horovod|torch) RECIPE_ARGS+=(--engine "$ENGINE") ;;
    *) die "ENGINE=$ENGINE: must be horovod or torch" ;;
  esac
  [ -n "${DATA:-}" ] && RECIPE_ARGS+=(--train "$DATA")
  [ -n "${VAL:-}" ] && RECIPE_ARGS+=(--val "$VAL")
  [ -n "${VIEWS:-}" ] && RECIPE_ARGS+=(--views "$VIEWS")
  [ -n "${BATCH:-}" ] && RECIPE_ARGS+=(--batch-size "$BATCH")
  [ -n "${EPOCHS:-}" ] && RECIPE_ARGS+=(--epochs "$EPOCHS")
  [ -n "${REGIME:-}" ] && RECIPE_ARGS+=(--regime "$REGIME")
  [ -n "${CHECKPOINT_EVERY:-}" ] && RECIPE_ARGS+=(--checkpoint-every "$CHECKPOINT_EVERY")
  # shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags: split on spaces on purpose
  RECIPE_ARGS+=(${EXTRA_ARGS:-})
}

# srun passes USR1 on to the tasks, but answers TERM by killing them: the step always gets USR1, which
# training treats like TERM (finish the step, checkpoint, exit 75).
_dali_ba_forward() {
  echo "batch: SIG$1 at $(date -Is): sending USR1 to the training step (it checkpoints and stops)"
  [ -n "${_STEP_PID:-}" ] && kill -s USR1 "$_STEP_PID" 2>/dev/null
}

# _dali_ba_first_failure RC LOG: after a failed step, name the rank (srun's task number) and node that
# failed first, from srun's "srun: error: <node>: task <n>: <how>" lines in LOG, and set STEP_RC to the
# step's status: that rank's exit code when it exited (the cause; the ranks srun then ended report a
# signal), else RC. A rank killed by a signal of its own (not srun's Terminated) is the cause even when
# a peer's "exit 1" (its collectives failed) reached srun first.
_dali_ba_first_failure() {
  local pattern='^srun: error: [^ :]+: tasks? [0-9][-0-9,]*: ' line node tasks how
  STEP_RC=$1
  { [ "$1" -eq 0 ] || [ "$1" -eq "$EXIT_RESUMABLE" ]; } && return 0
  # A stall: the ranks that could still act left with 76, srun killed the stalled one; the cause is the stall.
  if grep -q -E "${pattern}Exited with exit code $EXIT_STALLED\$" "$2" 2>/dev/null; then
    STEP_RC=$EXIT_STALLED
    return 0
  fi
  line=$(grep -E "$pattern" "$2" 2>/dev/null | grep -v -m1 -E ': (Exited with exit code [0-9]+|Terminated)$') ||
    line=$(grep -m1 -E "$pattern" "$2" 2>/dev/null) || return 0
  node=${line#srun: error: }; node=${node%%:*}
  tasks=${line#*: task}; tasks=${tasks#s}; tasks=${tasks# }; how=${tasks#*: }; tasks=${tasks%%:*}
  [[ $how =~ ^Exited\ with\ exit\ code\ ([0-9]+)$ ]] && STEP_RC=${BASH_REMATCH[1]}
  [ "$STEP_RC" -eq "$EXIT_RESUMABLE" ] && return 0
  echo "batch: the training step failed (exit $STEP_RC): rank $tasks on node $node failed ($how); srun" \
       "ended the other ranks" >&2
}

# _dali_ba_requeue_after_stall NODES: requeue this job after a stall on NODES (as after a node failure), unless it
# has stalled MAX_STALL_REQUEUES times already (counted in job.txt). The node is not excluded: SLURM refuses to
# change a running job's ExcNodeList ("Job is no longer pending execution") and ends the batch script at
# the requeue, so the next start may land on the same node; a node that hangs every time, or a file that
# never returns, ends the job after MAX_STALL_REQUEUES stalls (then --exclude the node the line names).
_dali_ba_requeue_after_stall() {
  local before
  before=$(grep -c '^=== .* stalled with exit' "$JOB_DIR/job.txt" 2>/dev/null)
  before=${before:-0}
  if [ "$before" -ge "${MAX_STALL_REQUEUES:-2}" ]; then
    echo "batch: a rank stalled again on ${1:-?} (exit $EXIT_STALLED, stall $((before + 1))): not requeued" \
         "(MAX_STALL_REQUEUES=${MAX_STALL_REQUEUES:-2}); the stall line above names what it waited for" >&2
    echo "=== $(date -Is) stalled with exit $EXIT_STALLED on ${1:-?}; not requeued" >> "$JOB_DIR/job.txt"
    return
  fi
  echo "batch: a rank stalled (exit $EXIT_STALLED) on ${1:-?}; requeueing job $SLURM_JOB_ID" \
       "(stall $((before + 1)) of at most ${MAX_STALL_REQUEUES:-2} requeued)"
  echo "=== $(date -Is) stalled with exit $EXIT_STALLED on ${1:-?}; requeued" >> "$JOB_DIR/job.txt"
  scontrol requeue "$SLURM_JOB_ID" || echo "batch: scontrol requeue $SLURM_JOB_ID failed; resubmit to resume" >&2
}

# dali_ba_srun ARGS...: srun --mpi=$SRUN_MPI ARGS (ENGINE=torch: --mpi=none) in the background,
# forwarding USR1/TERM; returns its exit status. On 75 it requeues this job (same id, SLURM_RESTART_COUNT+1), on 76
# up to MAX_STALL_REQUEUES times, unless NO_REQUEUE is set.
dali_ba_srun() {
  trap '_dali_ba_forward USR1' USR1
  trap '_dali_ba_forward TERM' TERM
  # --kill-on-bad-exit: the first rank to exit non-zero (a crash, kill -9, an error only it found) ends
  # the step at once; the others would otherwise wait in their next allreduce (Horovod over MPI never
  # notices a dead peer). Ranks that stop together (exit 1, 4, 74, 75) meet first, once rank 0 has written
  # its last, so this never cuts rank 0 short. --wait: a rank that ends with 0 leaves the rest 120 s.
  local mpi=${SRUN_MPI:-pmix} log
  [ "${ENGINE:-horovod}" = torch ] && mpi=none  # torch.distributed meets at the step's first node instead
  log=$(mktemp "${TMPDIR:-/tmp}/dali-ba-srun.XXXXXX") || log=/dev/null
  srun --mpi="$mpi" --kill-on-bad-exit=1 --wait=120 "$@" 2> >(tee "$log" >&2) &
  _STEP_PID=$!
  # A trapped signal interrupts `wait` (status > 128) while srun runs on: wait again until it is gone;
  # the last wait returns srun's own status.
  while ! wait "$_STEP_PID" && kill -0 "$_STEP_PID" 2>/dev/null; do :; done
  wait "$_STEP_PID"
  local rc=$?
  _STEP_PID=
  trap - USR1 TERM
  _dali_ba_first_failure "$rc" "$log"
  rc=$STEP_RC
  local stalled_nodes=""
  # the nodes of the stalled ranks: "rank R (node N) ..." in training's one line (the ranks that wait are named without)
  [ "$rc" -eq "$EXIT_STALLED" ] && stalled_nodes=$(grep -m1 'stalled (--stall-timeout' "$log" 2>/dev/null |
    grep -o -E 'rank [0-9]+ \(node [^)]+\)' | sed -E 's/.*\(node (.*)\)/\1/' | sort -u | paste -sd, -)
  [ "$log" = /dev/null ] || rm -f "$log"
  if [ "$rc" -eq "$EXIT_STALLED" ] && [ -z "${NO_REQUEUE:-}" ]; then
    _dali_ba_requeue_after_stall "$stalled_nodes"
  fi
  if [ "$rc" -eq "$EXIT_RESUMABLE" ] && [ -z "${NO_REQUEUE:-}" ]; then
    echo "batch: training stopped after a checkpoint (exit $rc); requeueing job $SLURM_JOB_ID"
    echo "=== $(date -Is) stopped with exit $rc; requeued" >> "$JOB_DIR/job.txt"
    scontrol requeue "$SLURM_JOB_ID" || echo "batch: scontrol requeue $SLURM_JOB_ID failed; resubmit to resume" >&2
  fi
  return "$rc"
}
