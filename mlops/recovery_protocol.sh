#!/usr/bin/env bash
# Resume a failed MM-Rec training run from its newest valid checkpoint at a lower learning rate
# (guide §7: "Loss NaN/Inf: ./mlops/recovery_protocol.sh").
#
#   mlops/recovery_protocol.sh CHECKPOINT_DIR [train_modular args...]
#
# Attempt n resumes `python3 -m mm_rec.scripts.train_modular` from the newest checkpoint in
# CHECKPOINT_DIR that loads (corrupt files are skipped) with the learning rate halved once more
# (--lr_scale 0.5, 0.25, 0.125 for a checkpoint saved at full learning rate), up to
# MMREC_MAX_ATTEMPTS (3) times, until a run exits 0. Each attempt is logged with a timestamp to
# stdout and to CHECKPOINT_DIR/recovery_protocol.log.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: recovery_protocol.sh CHECKPOINT_DIR [train_modular args...]

Resume training from the newest valid checkpoint in CHECKPOINT_DIR (corrupt files are skipped)
with the learning rate halved, retrying until a run succeeds. Attempt n passes
--lr_scale = 0.5 x min(the checkpoint's saved lr_scale, attempt n-1's scale): 0.5, 0.25, 0.125
for a checkpoint saved at the full learning rate.

Each attempt runs
    $PYTHON -m mm_rec.scripts.train_modular --resume_from NEWEST --checkpoint_dir CHECKPOINT_DIR \
        --lr_scale S [train_modular args...]
and is logged to stdout and CHECKPOINT_DIR/recovery_protocol.log.

environment:
  PYTHON              interpreter to use (default: python3)
  MMREC_MAX_ATTEMPTS  number of attempts (default: 3)
  MMREC_LR_FACTOR     factor applied to the learning rate per attempt (default: 0.5)

exit status: 0 when a resumed run finishes; 1 when every attempt failed or no valid checkpoint
exists; 2 on a usage error.
EOF
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
    usage; exit 0
fi

CKPT_DIR="$1"; shift
PYTHON="${PYTHON:-python3}"
MAX_ATTEMPTS="${MMREC_MAX_ATTEMPTS:-3}"
LR_FACTOR="${MMREC_LR_FACTOR:-0.5}"

if [[ ! -d "$CKPT_DIR" ]]; then
    echo "error: checkpoint directory not found: $CKPT_DIR" >&2
    exit 2
fi
if ! [[ "$MAX_ATTEMPTS" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: MMREC_MAX_ATTEMPTS must be a positive integer (got '$MAX_ATTEMPTS')" >&2
    exit 2
fi
for arg in "$@"; do
    case "$arg" in
        --resume_from|--resume_from=*|--checkpoint_dir|--checkpoint_dir=*|--lr_scale|--lr_scale=*)
            echo "error: $arg is set by recovery_protocol.sh; leave it out of the train_modular args" >&2
            exit 2 ;;
    esac
done

# Make the package importable from any working directory: the repository this script lives in
# goes first on PYTHONPATH (harmless when mm_rec is installed).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG_FILE="$CKPT_DIR/recovery_protocol.log"

log() {
    local line
    line="[$(date '+%Y-%m-%d %H:%M:%S')] recovery_protocol: $*"
    echo "$line"
    echo "$line" >> "$LOG_FILE"
}

# Prints "PATH SCALE": the newest checkpoint that loads, and the --lr_scale for the next attempt:
# LR_FACTOR x the lower of the checkpoint's own lr_scale (a run that recovered by itself saves its
# halved scale) and the previous attempt's scale. Prints nothing when no checkpoint loads.
next_attempt() {
    "$PYTHON" -c 'import sys
from mm_rec.training.checkpoint import newest_valid_checkpoint
path, state = newest_valid_checkpoint(sys.argv[1])
if path is not None:
    scale = min(float(state.get("lr_scale", 1.0)), float(sys.argv[2])) * float(sys.argv[3])
    print(path, repr(scale))' "$CKPT_DIR" "$1" "$LR_FACTOR"
}

log "starting in $CKPT_DIR: up to $MAX_ATTEMPTS attempts, learning rate x$LR_FACTOR per attempt"
scale=inf
for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
    found="$(next_attempt "$scale")" || {
        log "error: could not read the checkpoints with $PYTHON (is mm_rec importable?)"; exit 1; }
    if [[ -z "$found" ]]; then
        log "error: no valid checkpoint in $CKPT_DIR (attempt $attempt/$MAX_ATTEMPTS); nothing to resume from"
        exit 1
    fi
    checkpoint="${found% *}"
    scale="${found##* }"
    log "attempt $attempt/$MAX_ATTEMPTS: resuming from $checkpoint with --lr_scale $scale"
    status=0
    "$PYTHON" -m mm_rec.scripts.train_modular --resume_from "$checkpoint" --checkpoint_dir "$CKPT_DIR" \
        --lr_scale "$scale" "$@" || status=$?
    if [[ $status -eq 0 ]]; then
        log "attempt $attempt/$MAX_ATTEMPTS succeeded (resumed from $checkpoint, --lr_scale $scale)"
        exit 0
    fi
    if [[ $status -eq 130 ]]; then
        log "attempt $attempt/$MAX_ATTEMPTS interrupted; stopping"
        exit 130
    fi
    log "attempt $attempt/$MAX_ATTEMPTS failed with exit status $status"
done
log "error: all $MAX_ATTEMPTS attempts failed; see the output above and $LOG_FILE"
exit 1
