"""A --checkpoint_dir that already holds a run: refuse to mix a new run into it, or (--overwrite) set
the old run's log aside.

A run lives in its checkpoint directory: checkpoint_*.pt, metrics.jsonl, tensorboard/, loss plots.
A new run (no --resume_from) started there would overwrite same-named checkpoints, append a second
step 1, 2, ... to metrics.jsonl and let --keep_last prune the old run's checkpoints, so the trainer
refuses it (`refuse_reuse`) unless --overwrite is given. --overwrite deletes nothing: it moves the
old metrics.jsonl and tensorboard/ aside (`set_aside`), and the old checkpoints stay until the new
run saves the same names. Resuming (--resume_from) appends to the run in the directory, as before.
"""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.errors import UserError
from .checkpoint import list_checkpoints
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


def refuse_reuse(shown_dir: str, run: PreviousRun) -> UserError:
    """The one-line error for a new run aimed at a directory holding `run`; `shown_dir` is the
    --checkpoint_dir as the user typed it, so the suggested --resume_from path can be pasted."""
    if run.newest is None:
        return UserError(f"{shown_dir} already holds a run ({METRICS_FILE}, no checkpoint); start over there "
                         f"with --overwrite, or choose another --checkpoint_dir")
    resume = shlex.quote(os.path.join(shown_dir, run.newest.name))
    return UserError(f"{shown_dir} already holds a run (newest: {run.newest.name}); continue it with "
                     f"--resume_from {resume}, start over with --overwrite, or choose another --checkpoint_dir")


def _aside_name(path: Path, stamp: str) -> Path:
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}.bak-{stamp}-{n}")
    return candidate


def set_aside(directory: str | os.PathLike, include_tensorboard: bool) -> list[tuple[Path, Path]]:
    """--overwrite: rename the old run's metrics.jsonl (if it holds anything) and, when the run logs
    to the default CHECKPOINT_DIR/tensorboard, that folder (if not empty) to NAME.bak-YYYYmmdd-HHMMSS,
    so the new run starts a clean log. Renames only; nothing is deleted. Returns [(old, new)]."""
    directory = Path(directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    wanted = []
    metrics = directory / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        wanted.append(metrics)
    tensorboard = directory / TENSORBOARD_DIR
    if include_tensorboard and tensorboard.is_dir() and any(tensorboard.iterdir()):
        wanted.append(tensorboard)
    moved = []
    for path in wanted:
        target = _aside_name(path, stamp)
        try:
            os.rename(path, target)
        except OSError as e:
            done = "".join(f"; {a.name} was moved to {b.name}" for a, b in moved)
            raise UserError(f"--overwrite: cannot move {path} aside to {target.name} ({e.strerror or e}){done}; "
                            f"no file was deleted") from None
        moved.append((path, target))
    return moved


__all__ = ["PreviousRun", "find_previous_run", "refuse_reuse", "set_aside", "TENSORBOARD_DIR"]
