"""Checkpoints: the guide's format, written atomically, loaded safely.

A checkpoint `checkpoint_{stage}_step_{N}.pt` is a plain dict of tensors and Python scalars (no
pickled objects), so `torch.load(path, weights_only=True)` reads it. Keys: model_state_dict,
optimizer_state_dict, scheduler_state_dict, step, loss, stage, config (model config dict), plus
train_args, rng (torch CPU/CUDA RNG states), data_position and stage_completed.

Writes go through `utils.fileio.atomic_write`: a temporary `.checkpoint_*.tmp` in the same
directory, flushed to disk, given the umask's mode, then renamed over the final name. A crash
mid-save leaves the previous checkpoints untouched and no partial file under a final name (a kill
can leave the temporary: `remove_partial_saves` deletes those at the next start in the directory);
a full or read-only disk is one line ("no space left on device to write checkpoint ..."). The trainer writes them in the background (CheckpointWriter): a save costs the training
loop only a copy of the state into host memory, and the file is written while training goes on.
"""
from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path

import torch

from ..utils.errors import UserError
from ..utils.fileio import atomic_write, disk_error
from .stages import STAGE_NAMES

_NAME = re.compile(r"^checkpoint_(stage[123])_step_(\d+)\.pt$")


def checkpoint_name(stage: str, step: int) -> str:
    return f"checkpoint_{stage}_step_{step}.pt"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomically write `state` to `path` (temp file + fsync + rename, the umask's mode); a disk
    problem is a one-line UserError and leaves no temporary."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)
    return atomic_write(path, write, action="write checkpoint")


def remove_partial_saves(directory: str | os.PathLike) -> list[Path]:
    """Delete the `.checkpoint_*.tmp` files a process killed mid-save left in `directory` (each
    can be as large as a checkpoint). Call only while holding the directory's run lock: another
    live process's save in progress looks the same."""
    removed = []
    for p in Path(directory).glob(".checkpoint_*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


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
        self._error: str | None = None

    def save(self, state: dict, path: str | os.PathLike, done=None) -> None:
        self.wait()
        snapshot = snapshot_to_cpu(state)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned copies are complete
        if not self.background:
            self._write(snapshot, Path(path), done)
            self.check()
            return
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._write, args=(snapshot, Path(path), done, self._finished),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, snapshot: dict, path: Path, done, finished: threading.Event | None = None) -> None:
        try:
            save_checkpoint(snapshot, path)
            if done is not None:
                done(path)
        except UserError as e:  # a full or read-only disk, already one line
            self._error = str(e)
        except OSError as e:
            error = disk_error(e, path, "write checkpoint")
            self._error = str(error) if error else f"could not write checkpoint {path}: {e.strerror or e}"
        except BaseException as e:  # noqa: BLE001 - reported on the training thread
            self._error = f"could not write checkpoint {path}: {type(e).__name__}: {e}"
        finally:
            if finished is not None:
                finished.set()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Raise the failure of the last write, if it failed."""
        if self._error is not None:
            message, self._error = self._error, None
            raise UserError(f"{message}; earlier checkpoints are intact")

    def wait(self) -> None:
        """Block until the write in progress (if any) is on disk; raise if it failed."""
        if self._thread is not None:
            # An Event, not join() alone: a join interrupted by Ctrl-C can make the next join return
            # while the thread still writes; a second Ctrl-C here still interrupts this wait.
            while not self._finished.wait(0.5):
                pass
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


def non_finite_entry(state: dict) -> str | None:
    """The name of the first weight (or optimizer moment) of a checkpoint holding NaN or Inf, else None."""
    def bad(t) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    for name, tensor in (state.get("model_state_dict") or {}).items():
        if bad(tensor):
            return name
    for index, entry in ((state.get("optimizer_state_dict") or {}).get("state") or {}).items():
        for key, tensor in (entry.items() if isinstance(entry, dict) else ()):
            if bad(tensor):
                return f"optimizer state {index}/{key}"
    loss = state.get("loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        return "loss"
    return None


def check_finite(state: dict, path) -> None:
    """Refuse a checkpoint whose weights are not all finite (it would train or generate garbage)."""
    bad = non_finite_entry(state)
    if bad is not None:
        raise UserError(f"checkpoint {path} holds non-finite values ({bad}); resume from an earlier checkpoint")


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in `directory`, oldest first by (stage, step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((STAGE_NAMES.index(m.group(1)), int(m.group(2)), p))
    return [p for _, _, p in sorted(found)]


def checkpoint_position(path: str | os.PathLike) -> tuple[int, int] | None:
    """(stage index, step) from a standard checkpoint name, else None."""
    m = _NAME.match(Path(path).name)
    return (STAGE_NAMES.index(m.group(1)), int(m.group(2))) if m else None


def newest_valid_checkpoint(directory: str | os.PathLike, map_location="cpu", accept=None, on_skip=None):
    """(path, state) of the newest checkpoint that loads and holds only finite values, skipping
    corrupt and poisoned ones (each named by on_skip(path, reason) if given) and those for which
    accept(path, state) is False; (None, None) if none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path, map_location)
        except UserError:
            if on_skip is not None:
                on_skip(path, "corrupt or unreadable")
            continue
        if accept is not None and not accept(path, state):
            continue
        bad = non_finite_entry(state)
        if bad is not None:
            if on_skip is not None:
                on_skip(path, f"non-finite values ({bad})")
            continue
        return path, state
    return None, None


def prune_checkpoints(directory: str | os.PathLike, stage: str, keep_last: int, upto_step: int | None = None) -> None:
    """Keep the newest `keep_last` checkpoints of `stage` (0 or less keeps all); a finished stage's
    final checkpoint is its newest, so it always stays. With upto_step (the step just saved), only
    checkpoints at or before it count: a run resumed from an earlier step never prunes its own new
    files in favour of higher-numbered ones another trajectory left in the directory."""
    if keep_last <= 0:
        return
    ours = [p for p in list_checkpoints(directory) if _NAME.match(p.name).group(1) == stage
            and (upto_step is None or int(_NAME.match(p.name).group(2)) <= upto_step)]
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
