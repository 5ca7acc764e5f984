"""Checkpoints: the guide's format, written atomically, loaded safely.

A checkpoint `checkpoint_{stage}_step_{N}.pt` is a plain dict of tensors and Python scalars (no
pickled objects), so `torch.load(path, weights_only=True)` reads it. Keys: model_state_dict,
optimizer_state_dict, scheduler_state_dict, step, loss, stage, config (model config dict), plus
train_args, rng (torch CPU/CUDA RNG states), data_position and stage_completed.

Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
final name: a crash mid-save leaves the previous checkpoints untouched and no partial file under a
final name. The trainer writes them in the background (CheckpointWriter): a save costs the training
loop only a copy of the state into host memory, and the file is written while training goes on.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path

import torch

from ..utils.errors import UserError

STAGE_ORDER = ("stage1", "stage2", "stage3")
_NAME = re.compile(r"^checkpoint_(stage[123])_step_(\d+)\.pt$")


def checkpoint_name(stage: str, step: int) -> str:
    return f"checkpoint_{stage}_step_{step}.pt"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomically write `state` to `path` (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def snapshot_to_cpu(state):
    """A copy of `state` whose tensors are on the CPU and owned by the copy (containers rebuilt,
    other values shared: they are immutable), so that training can change the originals while the
    copy is written. GPU tensors go through pinned memory without waiting; call
    torch.cuda.synchronize() before reading the copy."""
    if isinstance(state, torch.Tensor):
        if state.device.type == "cpu":
            return state.detach().clone()
        out = torch.empty_like(state, device="cpu", pin_memory=True)
        return out.copy_(state.detach(), non_blocking=True)
    if isinstance(state, dict):
        return {k: snapshot_to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot_to_cpu(v) for v in state)
    return state


class CheckpointWriter:
    """Writes checkpoints one at a time in a background thread.

    save(state, path, done) snapshots `state` to host memory (the only cost to the training loop:
    a device-to-host copy), waits for the previous write if one is still going, and writes the
    file atomically (save_checkpoint) in a thread, then calls done(path) there. A failed write is
    raised as a UserError by the next check(), save() or wait(); earlier checkpoints stay intact.
    """

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: tuple | None = None

    def save(self, state: dict, path: str | os.PathLike, done=None) -> None:
        self.wait()
        snapshot = snapshot_to_cpu(state)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned copies are complete
        if not self.background:
            self._write(snapshot, Path(path), done)
            self.check()
            return
        self._thread = threading.Thread(target=self._write, args=(snapshot, Path(path), done),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, snapshot: dict, path: Path, done) -> None:
        try:
            save_checkpoint(snapshot, path)
            if done is not None:
                done(path)
        except OSError as e:
            self._error = (path, e.strerror or str(e))
        except BaseException as e:  # noqa: BLE001 - reported on the training thread
            self._error = (path, f"{type(e).__name__}: {e}")

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Raise the failure of the last write, if it failed."""
        if self._error is not None:
            path, reason = self._error
            self._error = None
            raise UserError(f"could not write checkpoint {path}: {reason}; earlier checkpoints are intact")

    def wait(self) -> None:
        """Block until the write in progress (if any) is on disk; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; a missing or unreadable file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, not a torch file at all ...
        raise UserError(f"checkpoint {path} is corrupt or not an MM-Rec checkpoint ({type(e).__name__}); "
                        f"pick another with --resume_from") from None
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise UserError(f"checkpoint {path} has no model_state_dict; it is not an MM-Rec training checkpoint")
    return state


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in `directory`, oldest first by (stage, step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((STAGE_ORDER.index(m.group(1)), int(m.group(2)), p))
    return [p for _, _, p in sorted(found)]


def newest_valid_checkpoint(directory: str | os.PathLike, map_location="cpu"):
    """(path, state) of the newest checkpoint that loads, skipping corrupt ones; (None, None) if none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except UserError:
            continue
    return None, None


def prune_checkpoints(directory: str | os.PathLike, stage: str, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints of `stage` (0 or less keeps all); a finished stage's
    final checkpoint is its newest, so it always stays."""
    if keep_last <= 0:
        return
    ours = [p for p in list_checkpoints(directory) if _NAME.match(p.name).group(1) == stage]
    for p in ours[:-keep_last]:
        p.unlink(missing_ok=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
