"""Writing files so that nothing half-written is ever left where a reader would take it.

Every checkpoint, export, session, prepared dataset and report goes through `atomic_write`:
the bytes go to a temporary file in the destination's directory, are flushed to disk, get the
permissions the user's umask asks for (mkstemp's 0600 would make shared exports unreadable),
and only then replace the destination. On any failure the temporary file is removed and a disk
problem (full, read-only, no permission) becomes one `UserError` line naming the path.
"""
from __future__ import annotations

import errno
import gc
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from .errors import UserError

_DISK_FULL_MARKERS = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "No space left")


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask. Read from /proc on Linux: os.umask can only be read by setting it, and
    for that moment a file or folder another thread creates (a server saves sessions from several)
    would get mode 0o777/0o666."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere: the set-and-restore dance, at least not racing itself
        mask = os.umask(0o077)  # (the brief mask is the strict one: a file made meanwhile is private)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def disk_error(exc: BaseException, path: str | os.PathLike, action: str = "write") -> UserError | None:
    """The one-line UserError for a disk problem while writing `path`, or None if `exc` is not one.

    torch.save to a path reports a full disk as RuntimeError("... unexpected pos ..."); safetensors
    as SafetensorError("... No space left ..."); plain writes as OSError(ENOSPC)."""
    path = Path(path)
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or code == errno.EDQUOT or (
            not isinstance(exc, OSError) and any(m in text for m in _DISK_FULL_MARKERS)):
        if code is None and "No space left" not in text:
            free = _free_bytes(path.parent)
            if free is not None and free > 64 << 20:  # not a full disk after all
                return UserError(f"could not {action} {path}: {text.splitlines()[0] if text else type(exc).__name__}")
        return UserError(f"no space left on device to {action} {path}; free some space or choose another directory")
    if code == errno.EROFS:
        return UserError(f"cannot {action} {path}: the filesystem is read-only; choose another directory")
    if code in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot {action} {path}: permission denied; choose a directory you can write to")
    if isinstance(exc, OSError) and code is not None:
        return UserError(f"cannot {action} {path}: {os.strerror(code)}")
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], action: str = "write") -> Path:
    """Call `write(tmp_path)`, then move tmp_path over `path` (same directory, so the rename is
    atomic). The file gets the umask's mode; a disk error is a UserError and leaves no temporary."""
    path = Path(path)
    tmp = None
    failure = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, file_mode())
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except Exception as e:  # noqa: BLE001 - only disk errors are translated; the rest re-raise
        failure = disk_error(e, path, action)
        if failure is None:
            raise
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    if failure is not None:
        # raised outside the except block, so the original traceback is gone: torch.save(path)
        # leaves its C++ writer (holding the unlinked file open) in a cycle with it, and until
        # that is collected the full disk stays full
        gc.collect()
        raise failure
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, action: str = "write") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), action)


def atomic_write_text(path: str | os.PathLike, text: str, action: str = "write") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), action)


def check_writable_dir(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """Create `directory` if needed and prove a file can be written there, before any long work."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        err = disk_error(e, directory, f"write to the {what}")
        raise (err or UserError(f"cannot write to the {what} {directory}: {e}")) from None
    return directory


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "disk_error", "check_writable_dir",
           "file_mode", "dir_mode", "current_umask"]
