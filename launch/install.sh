#!/usr/bin/env bash
# Install everything dali-ba needs on a fresh Debian machine, reusing what is already there.
#
#   bash launch/install.sh [--dali-cuda 120|130] [--print-dali-spec] [VENV]   (default VENV: .venv)
#
# Every pip install goes through the lock, launch/constraints.txt (make lock regenerates it;
# DALI_BA_CONSTRAINTS=none or =FILE installs your own versions, and the doctor then names the differences).
#
# Steps: Debian packages (Open MPI, CMake, a C++ compiler; SLURM, munge and PMIx for the tests that
# start a one-node SLURM) -> virtualenv -> torch/torchvision,
# NVIDIA DALI, mpi4py -> Horovod 0.28.1 built with MPI + Gloo (+ NCCL when a GPU and NCCL are
# present) -> dali-ba itself (editable). Every step is skipped when its result is already in place.
#
# DALI: the build for this machine's NVIDIA driver (dali_ba/install_choice.py, the rule the doctor
# also uses): nvidia-dali-cuda130 from driver 580, nvidia-dali-cuda120 from 525.60, cuda130 where
# there is no driver. --dali-cuda (or DALI_CUDA=120|130) names the build, DALI_SPEC the whole pip
# requirement. --print-dali-spec prints the choice and exits, installing nothing.
set -euo pipefail

print_dali_spec=0
VENV=.venv
while (($#)); do
  case $1 in
    --dali-cuda) [ $# -ge 2 ] || { echo "install: --dali-cuda needs 120 or 130" >&2; exit 2; }; DALI_CUDA=$2; shift ;;
    --dali-cuda=*) DALI_CUDA=${1#*=} ;;
    --print-dali-spec) print_dali_spec=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "install: unknown option $1 (--dali-cuda 120|130, --print-dali-spec, or the virtualenv folder)" >&2; exit 2 ;;
    *) VENV=$1 ;;
  esac
  shift
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$VENV/bin/python"
# The lock: every pip install below goes through launch/constraints.txt (written by make lock), so a
# new release of numpy or DALI moves nothing until the lock does. DALI_BA_CONSTRAINTS=none installs the
# newest of everything instead (make lock does), a path installs through that file.
CONSTRAINTS=${DALI_BA_CONSTRAINTS:-$ROOT/launch/constraints.txt}
TORCH_GIVEN=${TORCH_SPEC:+1}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}  # PyPI's torch 2.14.1 is built for CUDA 13.0
HOROVOD_VERSION=0.28.1

say() { echo "[install] $*"; }
die() { echo "install: $*" >&2; exit 1; }
[ "$CONSTRAINTS" = none ] || [ -f "$CONSTRAINTS" ] ||
  die "DALI_BA_CONSTRAINTS=$CONSTRAINTS: no such file (a pip constraints file, or none for the newest of everything)"
# The DALI rule, run from the checkout (standard library only): the spec, or with --plan what to do
# with the DALI installed in $1 (install SPEC, keep PKG==VERSION, replace OLD SPEC). Its reason goes to stderr.
dali_choice() {
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$1" -m dali_ba.install_choice ${DALI_CUDA:+--dali-cuda "$DALI_CUDA"} "${@:2}"
}
if ((print_dali_spec)); then
  dali_choice "$([ -x "$PY" ] && echo "$PY" || echo python3)"
  exit
fi

# 1. Debian packages -----------------------------------------------------------------------------
missing=()
for pkg in libopenmpi-dev openmpi-bin cmake g++ make slurm-wlm munge libpmix-dev fuse3 strace time; do  # fuse3: the stall tests' hung file system; strace and time: metadata calls and peak RSS per rank (index tests, benchmarks.startup)
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})"
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Virtualenv and Python packages -----------------------------------------------------------------
[ -x "$PY" ] || { say "creating $VENV"; python3 -m venv "$VENV"; }
pip_install() {
  if [ "$CONSTRAINTS" = none ]; then "$PY" -m pip install -q --disable-pip-version-check "$@"
  else "$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$@"; fi
}
dali_plan=$(dali_choice "$PY" --plan 2> >(sed 's/^/[install] /' >&2)) || exit 1
read -r dali_action dali_first dali_second <<<"$dali_plan"  # dali_second: the spec of a replace
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  if [[ -z $TORCH_GIVEN && ${dali_second:-$dali_first} == nvidia-dali-cuda120* ]]; then
    say "note: this driver runs CUDA 12 builds only, and $TORCH_SPEC from PyPI is built for CUDA 13: its torch" \
        "will not see the GPUs. Give TORCH_SPEC a CUDA 12 build (pip options included, e.g. TORCH_SPEC='torch" \
        "torchvision --index-url https://download.pytorch.org/whl/cu126'), then check with python -m dali_ba.doctor"
  fi
  # shellcheck disable=SC2086
  say "installing $TORCH_SPEC"; pip_install $TORCH_SPEC
fi
case $dali_action in
  # shellcheck disable=SC2086
  install) say "installing $dali_first"; pip_install $dali_first ;;
  # shellcheck disable=SC2086
  replace) say "replacing $dali_first by $dali_second"; "$PY" -m pip uninstall -q -y "$dali_first"; pip_install $dali_second ;;
esac
"$PY" -c "import mpi4py" 2>/dev/null || { say "installing mpi4py (built against Open MPI)"; pip_install "mpi4py==4.1.2"; }
pip_install numpy pillow pytest pytest-xdist pytest-timeout tqdm tomli-w "setuptools<81" wheel packaging psutil pyyaml cloudpickle cffi matplotlib scikit-image scikit-learn tensorboard \
  import-linter mfusepy timm  # make test: the import structure check (setup.cfg [importlinter]), its hung FUSE file system; --arch timm:<name>
# make lint (the first step of make test, and .pre-commit-config.yaml): pinned, so a new release's rules cannot fail CI.
pip_install ruff==0.17.5 mypy==2.4.1

# 3. Horovod, built from the 0.28.1 sdist (DALI_BA_WITHOUT_HOROVOD=1 skips it: the GPU machine's image
# has none, and launch/device_versions.sh copies that image) ---------------------------------------
if [ -z "${DALI_BA_WITHOUT_HOROVOD:-}" ] && ! "$PY" -c "import horovod.torch" 2>/dev/null; then
  say "building horovod==$HOROVOD_VERSION (a few minutes; pip caches the wheel for next time)"
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
  # Horovod's bundled gloo predates CMake 4's minimum-version policy.
  export CMAKE_POLICY_VERSION_MINIMUM=3.5
  # Horovod pins C++14; torch >= 2.1 headers need C++20. CMake's set() wins over flags, so a
  # compiler wrapper rewrites the standard (upstream fixed this on master only, PR #3998).
  export CXX="$ROOT/launch/cxx20.sh"
  # torch's CUDA build makes Horovod compile its CUDA parts: point it at the real toolkit.
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH"
  fi
  # NCCL allreduce only where a GPU is visible and NCCL ships beside torch.
  nccl_home=$("$PY" - <<'PY' 2>/dev/null || true
import os, nvidia.nccl as n
print(os.path.dirname(n.__file__) if n.__file__ else list(n.__path__)[0])
PY
)
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ -n "$nccl_home" ]; then
    say "GPU and NCCL found: HOROVOD_GPU_OPERATIONS=NCCL"
    export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$nccl_home" HOROVOD_NCCL_LINK=SHARED
  fi
  pip_install --no-build-isolation --no-binary horovod "horovod==$HOROVOD_VERSION"
fi

# 4. dali-ba itself ----------------------------------------------------------------------------------
# Every time (a few seconds): its metadata (the supported versions the doctor reads) and console scripts follow setup.cfg.
pip_install --no-build-isolation --no-deps -e "$ROOT"
say "ok: $("$PY" -c 'import torch, nvidia.dali, mpi4py, importlib.util as u; print(f"torch {torch.__version__}, DALI {nvidia.dali.__version__}, mpi4py {mpi4py.__version__}, horovod", __import__("horovod").__version__ if u.find_spec("horovod") else "not installed")')"
say "check a cluster node (or a whole job, under srun/mpirun/torchrun) with: $PY -m dali_ba.doctor"
