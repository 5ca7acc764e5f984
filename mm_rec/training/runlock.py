"""One training process per run directory.

Two trainers writing into one --checkpoint_dir interleave their checkpoints in one numbering and
their rows in one metrics.jsonl, and an --overwrite would move a live run's files aside. So a
trainer holds an exclusive `fcntl.flock` on CHECKPOINT_DIR/.mmrec-run.lock for as long as it
trains; it is taken before anything in the directory is read for reuse, moved or written. The
kernel drops the lock when the process exits, however it dies (kill -9 included), so a stale
lock never blocks a resume. Once past its start-up checks the holder writes its pid into the
file, which a refused process names, and empties it on release (a process killed with -9 leaves
its pid, harmless: the lock is what counts). The file itself stays (removing a lock file races
with the next taker), and a process refused at start-up leaves it as it was.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..utils.errors import UserError
from ..utils.fileio import disk_error, file_mode

LOCK_FILE = ".mmrec-run.lock"


class RunLock:
    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._published = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, shown_dir: str | None = None) -> "RunLock":
        """Take the lock or raise a one-line UserError naming the holder's pid. Creates the
        directory and the lock file if needed; changes nothing else."""
        shown = shown_dir or str(self.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as e:
            error = disk_error(e, self.directory, "write to checkpoint directory")
            raise UserError(f"cannot write to checkpoint directory {shown} ({error or e.strerror or e}); "
                            f"pick another --checkpoint_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process, still starting"
                raise UserError(f"{shown} is in use by a training process ({who}); wait for it to finish or "
                                f"stop it, or choose another --checkpoint_dir") from None
            raise UserError(f"cannot lock checkpoint directory {shown} ({e.strerror or e}); "
                            f"pick another --checkpoint_dir") from None
        self._fd = fd
        return self

    def publish_pid(self) -> None:
        """Write our pid into the lock file, for a refused process to name: once this process has
        passed its start-up checks (a process refused at start leaves the file as it found it)."""
        if self._fd is not None and not self._published:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
            self._published = True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if self._published:  # no stale pid for the next reader
                    os.ftruncate(fd, 0)
                    self._published = False
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


__all__ = ["RunLock", "LOCK_FILE"]
