#!/usr/bin/env bash
# Resume a failed MM-Rec training run from its newest valid checkpoint at a lower learning rate
# (guide §7: "Loss NaN/Inf: ./mlops/recovery_protocol.sh").
#
#   mlops/recovery_protocol.sh CHECKPOINT_DIR [train_modular args...]
#
# Attempt n resumes `python3 -m mm_rec.scripts.train_modular` from the newest checkpoint in
# CHECKPOINT_DIR that loads and holds finite weights (corrupt and poisoned files are skipped) with
# the learning rate halved once more (--lr_scale 0.5, 0.25, 0.125 for a checkpoint saved at full
# learning rate), with the flags the checkpoint was trained with (model size, schedule, data) unless
# given here, up to MMREC_MAX_ATTEMPTS (3) times, until a run exits 0. A run that exits 2 (a usage
# error, a directory in use, a full disk) is not retried. Each attempt is logged with a timestamp
# to stdout and to CHECKPOINT_DIR/recovery_protocol.log.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: recovery_protocol.sh CHECKPOINT_DIR [train_modular args...]

Resume training from the newest valid checkpoint in CHECKPOINT_DIR (corrupt files and checkpoints
holding NaN/Inf weights are skipped) with the learning rate halved, retrying until a run succeeds.
Attempt n passes --lr_scale = 0.5 x min(the checkpoint's saved lr_scale, attempt n-1's scale):
0.5, 0.25, 0.125 for a checkpoint saved at the full learning rate.

Each attempt runs
    $PYTHON -m mm_rec.scripts.train_modular --resume_from NEWEST --checkpoint_dir CHECKPOINT_DIR \
        --lr_scale S [the checkpoint's flags] [train_modular args...]
and is logged to stdout and CHECKPOINT_DIR/recovery_protocol.log. The checkpoint's flags are
those it was trained with (--preset, model sizes, schedule, --data_dir/--synthetic ...) that the
train_modular args do not give (none when they include --config). A run that exits 2 (a usage
error, a directory another trainer holds, a full disk) is not retried.

environment:
  PYTHON              interpreter to use (default: python3)
  MMREC_MAX_ATTEMPTS  number of attempts (default: 3)
  MMREC_LR_FACTOR     factor applied to the learning rate per attempt, in (0, 1] (default: 0.5)

exit status: 0 when a resumed run finishes; 1 when every attempt failed or no valid checkpoint
exists; 2 on a usage error (here, or the run's: it is not retried); 130 when interrupted.
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
if ! awk -v f="$LR_FACTOR" 'BEGIN { exit !(f ~ /^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$/ && f + 0 > 0 && f + 0 <= 1) }'; then
    echo "error: MMREC_LR_FACTOR must be a number in (0, 1], e.g. 0.5 (got '$LR_FACTOR')" >&2
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

# Prints the next attempt, one item per line: the newest checkpoint that loads and holds only
# finite weights (corrupt and poisoned ones are skipped, each named on stderr), the --lr_scale for
# the attempt (LR_FACTOR x the lower of the checkpoint's own lr_scale, which a run that recovered
# by itself saves halved, and the previous attempt's scale), then the train_modular flags the
# checkpoint was trained with that the user did not give (model size, schedule, data: nothing to
# repeat). Prints nothing when no checkpoint is usable; a one-line error and status 3 on failure.
next_attempt() {
    local previous="$1"; shift
    "$PYTHON" - "$CKPT_DIR" "$previous" "$LR_FACTOR" "$@" <<'PY'
import sys
try:
    from mm_rec.training.checkpoint import newest_valid_checkpoint
except Exception as e:  # noqa: BLE001
    print(f"error: cannot import mm_rec with {sys.executable}: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)
directory, previous, factor, *given = sys.argv[1:]
path, state = newest_valid_checkpoint(
    directory, on_skip=lambda p, why: print(f"recovery_protocol: skipping {p}: {why}", file=sys.stderr))
if path is None:
    sys.exit(0)
print(path)
print(repr(min(float(state.get("lr_scale", 1.0)), float(previous)) * float(factor)))
names = {a[2:].split("=", 1)[0] for a in given if a.startswith("--")}
if "config" not in names:  # a --config file sets its own flags: take nothing then
    import dataclasses
    from mm_rec.training.config import TrainConfig
    known = {f.name for f in dataclasses.fields(TrainConfig)}  # a flag of another version: left out
    skip = {"resume_from", "checkpoint_dir", "lr_scale", "overwrite", "profile_step", "config"}
    for key, value in (state.get("train_args") or {}).items():
        if key not in known or key in skip or key in names or value is None or value is False:
            continue
        print(f"--{key}")
        if value is not True:
            print(value)
PY
}

log "starting in $CKPT_DIR: up to $MAX_ATTEMPTS attempts, learning rate x$LR_FACTOR per attempt"
scale=inf
for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
    found=()
    listing="$(next_attempt "$scale" "$@")" || {
        log "error: could not read the checkpoints in $CKPT_DIR with $PYTHON"; exit 1; }
    [[ -n "$listing" ]] && mapfile -t found <<< "$listing"
    if [[ ${#found[@]} -lt 2 ]]; then
        log "error: no valid checkpoint in $CKPT_DIR (attempt $attempt/$MAX_ATTEMPTS); nothing to resume from"
        exit 1
    fi
    checkpoint="${found[0]}"
    scale="${found[1]}"
    inferred=("${found[@]:2}")
    log "attempt $attempt/$MAX_ATTEMPTS: resuming from $checkpoint with --lr_scale $scale"
    if [[ ${#inferred[@]} -gt 0 ]]; then
        log "flags from the checkpoint: ${inferred[*]}"
    fi
    status=0
    "$PYTHON" -m mm_rec.scripts.train_modular --resume_from "$checkpoint" --checkpoint_dir "$CKPT_DIR" \
        --lr_scale "$scale" "${inferred[@]}" "$@" || status=$?
    if [[ $status -eq 0 ]]; then
        log "attempt $attempt/$MAX_ATTEMPTS succeeded (resumed from $checkpoint, --lr_scale $scale)"
        exit 0
    fi
    if [[ $status -eq 130 ]]; then
        log "attempt $attempt/$MAX_ATTEMPTS interrupted; stopping"
        exit 130
    fi
    if [[ $status -eq 2 ]]; then
        # A usage error (a bad flag, a directory in use, a full disk ...): the same again cannot succeed.
        log "attempt $attempt/$MAX_ATTEMPTS failed with exit status 2 (an error to fix first, see above); not retrying"
        exit 2
    fi
    log "attempt $attempt/$MAX_ATTEMPTS failed with exit status $status"
done
log "error: all $MAX_ATTEMPTS attempts failed; see the output above and $LOG_FILE"
exit 1
