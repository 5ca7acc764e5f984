"""A --checkpoint_dir that already holds a run: refuse to mix a new run into it, or (--overwrite) set
the old run's log aside.

A run lives in its checkpoint directory: checkpoint_*.pt, metrics.jsonl, tensorboard/, loss plots.
A new run (no --resume_from) started there would overwrite same-named checkpoints, append a second
step 1, 2, ... to metrics.jsonl and let --keep_last prune the old run's checkpoints, so the trainer
refuses it (`refuse_reuse`) unless --overwrite is given. --overwrite deletes nothing: it moves the
earlier run's files into CHECKPOINT_DIR/previous_run.bak-TIMESTAMP/ (`set_aside`: renames, no
copies), so the new run starts in a clean directory and recovery or --keep_last never touch the old
run. Resuming (--resume_from) continues the run in the directory. Only one process trains in a
directory at a time (runlock.py); these checks run while holding its lock.
"""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.errors import UserError
from .checkpoint import list_checkpoints, load_checkpoint, non_finite_entry
from .metrics import METRICS_FILE

TENSORBOARD_DIR = "tensorboard"


@dataclass
class PreviousRun:
    checkpoints: list[Path] = field(default_factory=list)  # oldest first; the last is the newest
    metrics: Path | None = None  # a non-empty metrics.jsonl

    @property
    def newest(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None


def find_previous_run(directory: str | os.PathLike) -> PreviousRun | None:
    """What an earlier run left in `directory`: its checkpoint_*.pt files (ordered like
    `list_checkpoints`, by stage and step; other checkpoint_*.pt names before those, by time) and
    a non-empty metrics.jsonl. None when there is neither (an empty metrics.jsonl holds nothing)."""
    directory = Path(directory)
    try:
        if not directory.is_dir():
            return None
        standard = list_checkpoints(directory)
        others = sorted((p for p in directory.glob("checkpoint_*.pt") if p.is_file() and p not in standard),
                        key=lambda p: (p.stat().st_mtime, p.name))
        metrics = directory / METRICS_FILE
        has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    except OSError:  # unreadable: the writability check reports it
        return None
    if not (standard or others or has_metrics):
        return None
    return PreviousRun(checkpoints=others + standard, metrics=metrics if has_metrics else None)


def newest_valid(run: PreviousRun) -> Path | None:
    """The newest of `run`'s checkpoints that loads and holds only finite values (the one a
    resume can use), or None."""
    for path in reversed(run.checkpoints):
        try:
            state = load_checkpoint(path)
        except UserError:
            continue
        if non_finite_entry(state) is None:
            return path
    return None


def refuse_reuse(shown_dir: str, run: PreviousRun) -> UserError:
    """The one-line error for a new run aimed at a directory holding `run`; `shown_dir` is the
    --checkpoint_dir as the user typed it, so the suggested --resume_from path can be pasted: it
    ends the line, with nothing after it."""
    valid = newest_valid(run)
    if valid is None:
        what = (f"{METRICS_FILE}, no checkpoint" if run.newest is None
                else f"no valid checkpoint: {len(run.checkpoints)} corrupt or non-finite")
        return UserError(f"{shown_dir} already holds a run ({what}); start over there "
                         f"with --overwrite, or choose another --checkpoint_dir")
    resume = shlex.quote(os.path.join(shown_dir, valid.name))
    return UserError(f"{shown_dir} already holds a run; start over with --overwrite, choose another "
                     f"--checkpoint_dir, or continue it with --resume_from {resume}")


# What a run writes into its directory (the default TensorBoard folder is added when in use).
RUN_FILES = ("checkpoint_*.pt", METRICS_FILE, "loss_*.png", "tokenizer.json")


def set_aside(directory: str | os.PathLike, include_tensorboard: bool) -> Path | None:
    """--overwrite: move the earlier run's files (checkpoints, metrics.jsonl, loss plots,
    tokenizer.json and, when the new run logs to the default CHECKPOINT_DIR/tensorboard, that folder)
    into CHECKPOINT_DIR/previous_run.bak-YYYYmmdd-HHMMSS/. Renames only; nothing is deleted.
    Returns that folder, or None when there was nothing to move."""
    directory = Path(directory)
    wanted = sorted({p for pattern in RUN_FILES for p in directory.glob(pattern) if p.is_file()})
    tensorboard = directory / TENSORBOARD_DIR
    if include_tensorboard and tensorboard.is_dir():
        wanted.append(tensorboard)
    if not wanted:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = directory / f"previous_run.bak-{stamp}", 1
    while aside.exists():
        n += 1
        aside = directory / f"previous_run.bak-{stamp}-{n}"
    try:
        aside.mkdir()
        for path in wanted:
            os.rename(path, aside / path.name)
    except OSError as e:
        raise UserError(f"--overwrite: cannot move the earlier run into {aside} ({e.strerror or e}); "
                        f"no file was deleted (what moved is in {aside.name})") from None
    return aside


__all__ = ["PreviousRun", "find_previous_run", "newest_valid", "refuse_reuse", "set_aside", "RUN_FILES", "TENSORBOARD_DIR"]
