#!/usr/bin/env bash
# Regenerate launch/constraints.txt, the lock make installs through: a fresh virtualenv gets today's
# newest of everything (DALI_BA_CONSTRAINTS=none), and launch/freeze_lock.py pins what it holds (and the
# other DALI CUDA build). Commit the new lock with the numbers it moves.
#
#   bash launch/lock.sh [VENV]   (make lock; default VENV: a temporary folder, removed afterwards)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -ge 1 ]; then VENV=$1; else TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT; VENV=$TMP/venv; fi
DALI_BA_CONSTRAINTS=none bash "$ROOT/launch/install.sh" "$VENV"
"$VENV/bin/python" "$ROOT/launch/freeze_lock.py" > "$ROOT/launch/constraints.txt.new"
mv "$ROOT/launch/constraints.txt.new" "$ROOT/launch/constraints.txt"
echo "[lock] wrote launch/constraints.txt ($(grep -c '==' "$ROOT/launch/constraints.txt") packages)"
