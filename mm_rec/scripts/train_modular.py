"""Staged training of the MM-Rec modular model (the training guide's `train_modular`).

    python -m mm_rec.scripts.train_modular --stage all --preset tiny --checkpoint_dir ./checkpoints_tiny
    python -m mm_rec.scripts.train_modular --stage stage1 --batch_size 4 --checkpoint_dir ./checkpoints
    python -m mm_rec.scripts.train_modular --stage stage2 --resume_from ./checkpoints/checkpoint_stage1_step_5000.pt
    torchrun --nproc_per_node=4 -m mm_rec.scripts.train_modular --stage all --batch_size 8

A new run (no --resume_from) refuses a --checkpoint_dir that already holds a run, before writing
anything; --overwrite starts one there anyway (the earlier run is moved into
CHECKPOINT_DIR/previous_run.bak-TIMESTAMP/, nothing deleted). One process trains in a directory
at a time: a second one is refused with the pid of the first. Ctrl-C saves the last completed step
and prints the --resume_from that continues it (exit 130).

Run with --help for every flag; `--config FILE` reads them from YAML or JSON.
"""
from __future__ import annotations

import sys

from mm_rec.training.config import parse_args
from mm_rec.utils.errors import run_cli


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from mm_rec.training.interrupt import TrainingInterrupted
    from mm_rec.training.recovery import TrainingDiverged
    from mm_rec.training.trainer import Trainer  # after parsing, so --help and flag errors are instant
    try:
        Trainer(cfg).run()
    except TrainingInterrupted as e:  # Ctrl-C: a checkpoint of the last step is saved; say where
        sys.stderr.write(f"{e}\n")
        sys.stderr.flush()
        return e.exit_code
    except TrainingDiverged as e:  # one line, exit 1: no usage error (recovery_protocol.sh retries it)
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return e.exit_code
    return 0


def cli() -> None:
    """Console-script entry point: user errors as one line and exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
