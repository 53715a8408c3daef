#!/usr/bin/env bash
# launch/single_node.sh - train a config on this machine: one process, one pipeline stage per local GPU
# (the CPU fallback - one logical CPU device per stage - when there is no GPU).
#
#   launch/single_node.sh CONFIG.yaml [--set key.sub=value ...] [--run-dir DIR]
#
# Environment: PIPELINE_PYTHON (default: python3) is the Python that has the package installed.
# Exit codes: those of `pipeline train` (0 done, 2 bad config, 75 preempted: rerun to resume).
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit "${1:-2}"
}

[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; -*) echo "error: the first argument must be a config file, got '$1'" >&2; usage 2 ;; esac
CONFIG=$1; shift
[ -f "$CONFIG" ] || { echo "error: config file '$CONFIG' does not exist (try configs/digits_cnn.yaml)" >&2; exit 2; }
PYTHON=${PIPELINE_PYTHON:-python3}

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ "$gpus" -gt 0 ]; then
    echo "[single_node] $gpus GPU(s): one stage per GPU" >&2
else
    echo "[single_node] no GPU: CPU fallback (one logical CPU device per stage)" >&2
fi
# exec: SIGTERM/SIGUSR1 reach the trainer directly (it checkpoints and exits 75).
exec "$PYTHON" -m pipeline train "$CONFIG" "$@"
