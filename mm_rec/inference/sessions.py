"""Session memory: keep a conversation's recurrent state on disk and pick it up later.

A recurrent model's whole context is its memory state (a few MB, whatever the number of tokens
seen), so a session is just that state:

    base_dir/<session_id>/session.safetensors   tensors "<expert>.<layer>.<h|M>" (e.g. "text.3.h"),
                                                and in the same file's header the metadata: model
                                                config hash, token count, experts, dtype, version, times
    base_dir/<session_id>/lock                  the per-session lock (fcntl.flock), empty

State and metadata are one file, written to a temporary name and renamed into place
(utils/fileio.atomic_write), so a reader sees one whole write or the previous one, never a state
from one write with the metadata of another, and a crash leaves the previous session intact.
Continuing from a loaded session gives exactly what an uninterrupted run gives: safetensors stores
the tensors bit for bit.

Concurrency. Two writers of one session are serialised by an exclusive flock on its lock file
(released by the kernel if a holder dies); `generate --session` holds it from load to save, so two
concurrent turns both land, one after the other. Each save increments `version`; a writer that
does not hold the lock across its turn (a server) passes the version it loaded as
`expected_version`, and a save over a newer version is refused with one line telling to retry.

Everything read from disk is checked before use (field types, tensor names, shapes, dtypes, finite
values, and with `config` the model it belongs to): a damaged or foreign session is one UserError
naming the file and the field. Sessions written by earlier versions (state.safetensors +
metadata.json) are still read; the next save replaces them with the single file.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..utils.errors import UserError
from ..utils.fileio import atomic_write_bytes, disk_error
from .state import RecurrentState, flat_by_dtype, split_flat

SESSION_NAME = "session.safetensors"
LOCK_NAME = "lock"
HEADER_KEY = "mmrec_session"  # safetensors metadata entry holding the JSON metadata
FORMAT_VERSION = 2
# Layout 1 (read only): two files, written as a directory swapped in by rename.
STATE_NAME = "state.safetensors"
METADATA_NAME = "metadata.json"
# Starting with "." is refused: it rules out "." and ".." and keeps ids apart from temporary files.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_STATE_KEY = re.compile(r"([A-Za-z0-9_]+)\.(\d+)\.(h|M)")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)  # bfloat16 has no numpy dtype
_MAX_HEADER = 16 << 20
_held = threading.local()  # lock files this thread holds: a nested lock() of the same session is a no-op


def validate_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise UserError(f"invalid session id {session_id!r}: use 1-128 letters, digits, '_', '-' or '.', "
                        "not starting with '.'")
    return session_id


def flatten_states(memory_states: dict) -> dict[str, torch.Tensor]:
    """{"text": [{"h", "M"}, ...]} -> {"text.0.h": tensor, "text.0.M": tensor, ...}, on the CPU"""
    flat = {}
    for expert, layers in memory_states.items():
        for i, layer in enumerate(layers):
            for key, tensor in layer.items():
                flat[f"{expert}.{i}.{key}"] = tensor.detach().to("cpu").contiguous()
    return flat


def _states_on_host(memory_states: dict, where: str) -> dict[str, "np.ndarray | torch.Tensor"]:
    """flatten_states(memory_states), checked finite (else a UserError naming the tensor), through
    one copy to the host per dtype instead of one per tensor: a server saves from many threads while
    its engine runs; each copy from the device waits for it, each call into torch lets another
    thread take the GIL. fp16/32/64 come as numpy views of that copy (no call into torch each)."""
    named = {f"{expert}.{i}.{key}": tensor for expert, layers in memory_states.items()
             for i, layer in enumerate(layers) for key, tensor in layer.items()}
    tensors = list(named.values())
    for name, tensor in named.items():
        if not tensor.is_floating_point():
            raise UserError(f"{where}: the memory state {name} is not finite floats; not saving it")
    host: list = [None] * len(tensors)
    for group, flat in flat_by_dtype(tensors):
        flat = flat.cpu()
        if not bool(torch.isfinite(flat).all()):
            name = next(n for n, t in named.items() if not bool(torch.isfinite(t).all()))
            raise UserError(f"{where}: the memory state {name} is not finite floats; not saving it")
        if flat.dtype in _NUMPY_DTYPES:
            array, start = flat.numpy(), 0
            for i in group:
                host[i] = array[start:start + tensors[i].numel()].reshape(tensors[i].shape)
                start += tensors[i].numel()
        else:
            for i, view in zip(group, split_flat(flat, [tensors[i] for i in group])):
                host[i] = view
    return dict(zip(named, host))


def _safetensors_bytes(host: dict, metadata: dict[str, str]) -> bytes:
    """The file safetensors.torch.save(flatten_states(...), metadata) writes, byte for byte."""
    if all(isinstance(h, np.ndarray) for h in host.values()):
        from safetensors.numpy import save
        return save(host, metadata=metadata)
    from safetensors.torch import save
    return save({n: torch.from_numpy(h) if isinstance(h, np.ndarray) else h for n, h in host.items()},
                metadata=metadata)


def unflatten_states(flat: dict[str, torch.Tensor]) -> dict:
    nested: dict[str, dict[int, dict]] = {}
    for name, tensor in flat.items():
        expert, layer, key = name.split(".")
        nested.setdefault(expert, {}).setdefault(int(layer), {})[key] = tensor
    return {expert: [layers[i] for i in sorted(layers)] for expert, layers in nested.items()}


def _config_hash(config=None, config_hash: str | None = None) -> str | None:
    if config is not None:
        return config.arch_hash()
    return config_hash


def state_nbytes(config, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a session's tensors for a model of `config` (h [B, d] and M [B, H, dh, dh] per layer)."""
    per_layer = config.expert_dim + config.num_heads * config.head_dim ** 2
    size = torch.empty((), dtype=dtype).element_size()
    return len(config.expert_names) * config.num_layers * per_layer * batch_size * size


# -- checking what was read -------------------------------------------------------------------------


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_metadata(metadata, where: str) -> dict:
    """The metadata's fields, each of the type the code relies on; `where` names the session and file."""
    def bad(field, expected):
        value = metadata.get(field) if isinstance(metadata, dict) else metadata
        return UserError(f"{where} is corrupt: field {field!r} is {value!r}, expected {expected}; "
                         "delete the session and start a new one")
    if not isinstance(metadata, dict):
        raise bad("metadata", "a JSON object")
    if metadata.get("format_version") not in (1, FORMAT_VERSION):
        raise UserError(f"{where} is not an MM-Rec session (format_version {metadata.get('format_version')!r})")
    checks = {
        "token_count": (lambda v: v is None or _is_count(v), "a token count (integer >= 0)"),
        "version": (lambda v: _is_count(v), "an integer >= 0"),
        "batch_size": (lambda v: v is None or (_is_count(v) and v > 0), "an integer >= 1"),
        "config_hash": (lambda v: v is None or isinstance(v, str), "a string"),
        "experts": (lambda v: isinstance(v, list) and v and all(isinstance(e, str) for e in v), "a list of expert names"),
        "created": (lambda v: v is None or isinstance(v, str), "a time stamp"),
    }
    metadata.setdefault("version", 0)  # layout 1 had no version
    for field, (ok, expected) in checks.items():
        if not ok(metadata.get(field)):
            raise bad(field, expected)
    return metadata


def check_states(flat: dict, metadata: dict, where: str, config=None, batch_size: int | None = None) -> dict:
    """Nested states from the flat tensors, after checking names, dtypes, shapes and values."""
    def corrupt(what):
        return UserError(f"{where} is corrupt: {what}; delete the session and start a new one")

    def misfit(what):
        return UserError(f"{where} does not fit this model: {what}; start a new session")

    nested: dict[str, dict[int, dict]] = {}
    for name, tensor in flat.items():
        m = _STATE_KEY.fullmatch(name)
        if m is None:
            raise corrupt(f"tensor {name!r} is not a memory state (<expert>.<layer>.<h|M>)")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise corrupt(f"tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, not a float type")
        if not bool(torch.isfinite(tensor).all()):
            raise corrupt(f"tensor {name} holds NaN or inf")
        nested.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensor
    if sorted(nested) != sorted(metadata["experts"]):
        raise corrupt(f"its state holds experts {sorted(nested)}, its metadata {metadata['experts']}")
    batches = set()
    for expert, layers in nested.items():
        if sorted(layers) != list(range(len(layers))):
            raise corrupt(f"expert {expert} has layers {sorted(layers)}, not 0..{len(layers) - 1}")
        for i, layer in layers.items():
            h, M = layer.get("h"), layer.get("M")
            if h is None or M is None:
                raise corrupt(f"layer {expert}.{i} lacks {'h' if h is None else 'M'}")
            if h.dim() != 2 or M.dim() != 4 or M.shape[0] != h.shape[0] or M.shape[2] != M.shape[3] \
                    or M.shape[1] * M.shape[2] != h.shape[1]:
                raise corrupt(f"layer {expert}.{i} has shapes h {list(h.shape)}, M {list(M.shape)}")
            batches.add(h.shape[0])
    if len(batches) != 1:
        raise corrupt(f"its tensors have different batch sizes {sorted(batches)}")
    batch = batches.pop()
    if metadata.get("batch_size") not in (None, batch):
        raise corrupt(f"field 'batch_size' is {metadata['batch_size']}, its tensors hold {batch}")
    if batch_size is not None and batch != batch_size:
        raise misfit(f"it holds {batch} sequences, {batch_size} expected")
    states = {expert: [layers[i] for i in sorted(layers)] for expert, layers in nested.items()}
    if config is not None:
        d, H, Dh = config.expert_dim, config.num_heads, config.head_dim
        for expert, layers in states.items():
            if expert not in config.expert_names or len(layers) != config.num_layers:
                raise misfit(f"expert {expert!r} with {len(layers)} layers")
            if layers[0]["h"].shape[1:] != (d,) or layers[0]["M"].shape[1:] != (H, Dh, Dh):
                raise misfit("its state shapes differ")
    return states


def _read_header(data: bytes, path: Path) -> dict:
    """The JSON metadata stored in a session file's safetensors header."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > min(_MAX_HEADER, len(data) - 8):
            raise ValueError("header length out of range")
        header = json.loads(data[8:8 + n])
        return json.loads(header["__metadata__"][HEADER_KEY])
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt: its header is unreadable ({type(e).__name__}); "
                        "delete the session and start a new one") from None


# -- the manager ------------------------------------------------------------------------------------


class SessionMemoryManager:
    """Save, load, list, lock and delete memory states by session id under base_dir."""

    def __init__(self, base_dir):
        self.base_dir = Path(base_dir)

    def session_dir(self, session_id: str) -> Path:
        return self.base_dir / validate_session_id(session_id)

    def session_file(self, session_id: str) -> Path:
        return self.session_dir(session_id) / SESSION_NAME

    def exists(self, session_id: str) -> bool:
        folder = self.session_dir(session_id)
        return (folder / SESSION_NAME).is_file() or (folder / METADATA_NAME).is_file()

    # -- locking ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, session_id: str, wait: bool = True, on_wait=None):
        """Hold the session's exclusive lock (other processes and threads wait, or with wait=False
        get a UserError). Re-entering it in the same thread is a no-op, so asyncio tasks sharing a
        thread do not exclude each other: they save with expected_version instead. on_wait() is
        called once if the lock is busy, before waiting."""
        folder = self.session_dir(session_id)
        path = folder / LOCK_NAME
        held = _held.__dict__.setdefault("paths", set())
        key = str(path.absolute())
        if key in held:
            yield
            return
        fd = self._acquire(session_id, folder, path, wait, on_wait)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            os.close(fd)  # releases the flock

    def _acquire(self, session_id, folder: Path, path: Path, wait: bool, on_wait) -> int:
        while True:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:
                continue  # the folder was deleted between mkdir and open
            except OSError as e:
                raise (disk_error(e, path, f"lock session {session_id!r} at")
                       or UserError(f"cannot lock session {session_id!r} ({path}): {e}")) from None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        raise UserError(f"session {session_id!r} is in use by another process; retry when "
                                        "its turn is done") from None
                    if on_wait is not None:
                        on_wait()
                        on_wait = None
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # delete_session may have removed the lock file while we waited: lock the new one
                mine, current = os.fstat(fd), os.stat(path)
                if (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    # -- writing ---------------------------------------------------------------------------------

    def serialize_state(self, session_id: str, memory_states: dict, token_count: int | None = None,
                        config=None, config_hash: str | None = None, extra: dict | None = None,
                        expected_version: int | None = None) -> Path:
        """Write the session as one atomic file (replacing an older one with the same id).

        expected_version: the `version` the caller loaded; if the session has been saved since, the
        save is refused (UserError) instead of overwriting that turn. Returns the session folder."""
        validate_session_id(session_id)
        if not memory_states:
            raise UserError(f"session {session_id!r}: there is no memory state to save")
        if token_count is not None and not _is_count(token_count):
            raise UserError(f"session {session_id!r}: token_count must be an integer >= 0, got {token_count!r}")
        host = _states_on_host(memory_states, f"session {session_id!r}")
        dtypes = sorted({str(h.dtype).removeprefix("torch.") for h in host.values()})
        batch = {h.shape[0] for h in host.values()}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with self.lock(session_id):
            current = self._current_metadata(session_id)
            version = current["version"] if current else 0
            if expected_version is not None and expected_version != version:
                raise UserError(f"session {session_id!r} was saved by another writer since it was loaded "
                                f"(version {version}, expected {expected_version}); load it again and retry")
            metadata = {
                **(extra or {}),
                "format_version": FORMAT_VERSION,
                "session_id": session_id,
                "version": version + 1,
                "config_hash": _config_hash(config, config_hash),
                "token_count": token_count,
                "experts": list(memory_states),
                "num_layers": {name: len(layers) for name, layers in memory_states.items()},
                "batch_size": batch.pop() if len(batch) == 1 else None,
                "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
                "created": (current or {}).get("created") or now,
                "updated": now,
            }
            folder = self.session_dir(session_id)
            self._remove_stale_temporaries(folder)
            data = _safetensors_bytes(host, {HEADER_KEY: json.dumps(metadata)})  # (a few MB at most)
            try:
                atomic_write_bytes(folder / SESSION_NAME, data, action=f"save session {session_id!r} to")
            except UserError:
                if current is None and not (folder / SESSION_NAME).exists():
                    # a new session that could not be written leaves no trace (its folder held
                    # only the lock: a waiter sees it gone and locks afresh, as after a delete)
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            for old in (METADATA_NAME, STATE_NAME):  # layout 1, now superseded by the file above
                (folder / old).unlink(missing_ok=True)
        return folder

    @staticmethod
    def _remove_stale_temporaries(folder: Path) -> None:
        """Temporary files of a writer killed mid-save (we hold the lock: no live writer owns one)."""
        for tmp in folder.glob(f".{SESSION_NAME}.*.tmp"):
            tmp.unlink(missing_ok=True)

    def _current_metadata(self, session_id: str) -> dict | None:
        """The stored metadata, or None if there is none or it is unreadable (then it is replaced)."""
        if not self.exists(session_id):  # a new session: _read's not-found error would list every session
            return None
        try:
            return self.load_metadata(session_id)
        except UserError:
            return None

    # -- reading ---------------------------------------------------------------------------------

    def _not_found(self, session_id: str) -> UserError:
        known = ", ".join(self.list_sessions()[:10]) or "none"
        return UserError(f"session {session_id!r} not found in {self.base_dir} (sessions: {known})")

    def _read(self, session_id: str, with_tensors: bool) -> tuple[dict | None, dict, str]:
        """(flat tensors or None, checked metadata, description for errors) from one read."""
        folder = self.session_dir(session_id)
        path = folder / SESSION_NAME
        for _ in range(3):  # a save migrating a layout-1 session may remove its files under us
            try:
                with open(path, "rb") as f:  # one open: the whole of one write, whatever renames follow
                    data = f.read() if with_tensors else f.read(8)
                    if not with_tensors and len(data) == 8:
                        data += f.read(min(struct.unpack("<Q", data)[0], _MAX_HEADER))
            except FileNotFoundError:
                if not (folder / METADATA_NAME).is_file():
                    if path.is_file():
                        continue
                    raise self._not_found(session_id) from None
                try:
                    return self._read_layout1(session_id, folder, with_tensors)
                except UserError:
                    if path.is_file() or not (folder / METADATA_NAME).is_file():
                        continue  # migrated (or deleted) meanwhile: read again
                    raise
            except OSError as e:
                raise UserError(f"session {session_id!r}: cannot read {path} ({e.strerror or e})") from None
            where = f"session {session_id!r} ({path})"
            metadata = check_metadata(_read_header(data, path), where)
            flat = None
            if with_tensors:
                from safetensors.torch import load
                try:
                    flat = load(data)
                except Exception as e:  # truncated, malformed
                    raise UserError(f"{where} is corrupt: its tensors cannot be read ({type(e).__name__}); "
                                    "delete the session and start a new one") from None
            return flat, metadata, where
        raise self._not_found(session_id)

    def _read_layout1(self, session_id: str, folder: Path, with_tensors: bool):
        from safetensors.torch import load_file
        meta_path, state_path = folder / METADATA_NAME, folder / STATE_NAME
        try:
            metadata = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"session {session_id!r} is corrupt: {meta_path} is unreadable ({type(e).__name__}); "
                            "delete it and start a new session") from None
        metadata = check_metadata(metadata, f"session {session_id!r} ({meta_path})")
        flat = None
        if with_tensors:
            try:
                flat = load_file(str(state_path))
            except Exception as e:  # missing or truncated file
                raise UserError(f"session {session_id!r} is corrupt: {state_path} cannot be read "
                                f"({type(e).__name__}); delete it and start a new session") from None
        return flat, metadata, f"session {session_id!r} ({state_path})"

    def load_metadata(self, session_id: str) -> dict:
        return self._read(session_id, with_tensors=False)[1]

    def load(self, session_id: str, device="cpu", config=None, config_hash: str | None = None,
             batch_size: int | None = None) -> tuple[dict, dict]:
        """(memory states on `device`, metadata), both from the same write. With config (or
        config_hash) another model's state is refused; with batch_size, a state of another batch."""
        flat, metadata, where = self._read(session_id, with_tensors=True)
        expected = _config_hash(config, config_hash)
        if expected is not None and metadata.get("config_hash") not in (None, expected):
            raise UserError(f"session {session_id!r} was saved by a different model (config hash "
                            f"{metadata.get('config_hash')}, this model {expected}); start a new session")
        states = check_states(flat, metadata, where, config, batch_size)
        if str(device) != "cpu":  # one transfer per dtype, not one per tensor
            states = RecurrentState.from_memory_states(states).compact(device).to_memory_states()
        return states, metadata

    def load_state(self, session_id: str, device="cpu", config=None, config_hash: str | None = None,
                   batch_size: int | None = None) -> dict:
        """The stored memory states on `device` (see load)."""
        return self.load(session_id, device, config, config_hash, batch_size)[0]

    # -- listing and deleting --------------------------------------------------------------------

    def list_sessions(self) -> list[str]:
        if not self.base_dir.is_dir():
            return []
        return sorted(p.name for p in self.base_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and _SESSION_ID.fullmatch(p.name)
                      and ((p / SESSION_NAME).is_file() or (p / METADATA_NAME).is_file()))

    def delete_session(self, session_id: str) -> None:
        folder = self.session_dir(session_id)
        if not self.exists(session_id):
            raise UserError(f"session {session_id!r} not found in {self.base_dir}")
        with self.lock(session_id):
            try:
                shutil.rmtree(folder)  # the lock file too: a waiter sees it replaced and locks afresh
            except OSError as e:
                raise (disk_error(e, folder, "delete") or UserError(f"cannot delete {folder}: {e}")) from None
