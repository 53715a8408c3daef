#!/usr/bin/env bash
# launch/replicas.sh - N data-parallel replicas of the whole pipeline on this machine, with horovodrun.
# Each replica is one process driving its own stages; gradients are all-reduced once per step.
#
#   launch/replicas.sh N CONFIG.yaml [--set key.sub=value ...] [--run-dir DIR]
#
# Needs Horovod built for this TensorFlow (see launch/install_horovod.sh).
# Environment: PIPELINE_PYTHON (default: python3); HOROVODRUN (default: horovodrun next to it, else on PATH).
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit "${1:-2}"
}

[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac
[ $# -ge 2 ] || { echo "error: need a replica count N and a config file" >&2; usage 2; }
N=$1; CONFIG=$2; shift 2
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "error: N must be a whole number >= 1, got '$N'" >&2; usage 2; }
[ -f "$CONFIG" ] || { echo "error: config file '$CONFIG' does not exist (try configs/digits_cnn.yaml)" >&2; exit 2; }
PYTHON=${PIPELINE_PYTHON:-python3}

if ! "$PYTHON" -c "import horovod.tensorflow" >/dev/null 2>&1; then
    echo "error: Horovod is not installed for $PYTHON (import horovod.tensorflow failed)." >&2
    echo "       Build it for this TensorFlow with: bash launch/install_horovod.sh" >&2
    echo "       (or train one replica without it: launch/single_node.sh $CONFIG)" >&2
    exit 3
fi
HOROVODRUN=${HOROVODRUN:-$(dirname "$(command -v "$PYTHON")")/horovodrun}
[ -x "$HOROVODRUN" ] || HOROVODRUN=$(command -v horovodrun || true)
[ -n "$HOROVODRUN" ] || { echo "error: horovodrun not found next to $PYTHON nor on PATH" >&2; exit 3; }

echo "[replicas] $N replicas of the pipeline with $HOROVODRUN" >&2
exec "$HOROVODRUN" -np "$N" -H "localhost:$N" "$PYTHON" -m pipeline train "$CONFIG" "$@"
