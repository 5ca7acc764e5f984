"""Session memory: keep a conversation's recurrent state on disk and pick it up later.

A recurrent model's whole context is its memory state (a few MB, whatever the number of tokens
seen), so a session is just that state:

    base_dir/<session_id>/state.safetensors   tensors, keys "<expert>.<layer>.<h|M>" e.g. "text.3.h"
    base_dir/<session_id>/metadata.json       model config hash, token count, experts, dtype, times

Continuing from a loaded session gives exactly what an uninterrupted run gives: safetensors stores
the tensors bit for bit. A session is written to a temporary directory and renamed into place, so
a crash never leaves a half-written session under its id. Loading checks the model config hash:
a state from another architecture is refused rather than silently producing garbage.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..utils.errors import UserError

STATE_NAME = "state.safetensors"
METADATA_NAME = "metadata.json"
FORMAT_VERSION = 1
# Starting with "." is refused: it rules out "." and ".." and keeps ids apart from our temp dirs.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


def validate_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise UserError(f"invalid session id {session_id!r}: use 1-128 letters, digits, '_', '-' or '.', "
                        "not starting with '.'")
    return session_id


def flatten_states(memory_states: dict) -> dict[str, torch.Tensor]:
    """{"text": [{"h", "M"}, ...]} -> {"text.0.h": tensor, "text.0.M": tensor, ...}"""
    flat = {}
    for expert, layers in memory_states.items():
        for i, layer in enumerate(layers):
            for key, tensor in layer.items():
                flat[f"{expert}.{i}.{key}"] = tensor.detach().to("cpu").contiguous()
    return flat


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


class SessionMemoryManager:
    """Save, load, list and delete memory states by session id under base_dir."""

    def __init__(self, base_dir):
        self.base_dir = Path(base_dir)

    def session_dir(self, session_id: str) -> Path:
        return self.base_dir / validate_session_id(session_id)

    def exists(self, session_id: str) -> bool:
        return (self.session_dir(session_id) / METADATA_NAME).is_file()

    def serialize_state(self, session_id: str, memory_states: dict, token_count: int | None = None,
                        config=None, config_hash: str | None = None, extra: dict | None = None) -> Path:
        """Write the session atomically (replacing an older one with the same id)."""
        from safetensors.torch import save_file
        target = self.session_dir(session_id)
        if not memory_states:
            raise UserError(f"session {session_id!r}: there is no memory state to save")
        flat = flatten_states(memory_states)
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in flat.values()})
        batch = {t.shape[0] for t in flat.values()}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        created = now
        if (target / METADATA_NAME).is_file():
            try:
                created = json.loads((target / METADATA_NAME).read_text()).get("created", now)
            except (OSError, json.JSONDecodeError):
                pass
        metadata = {
            "format_version": FORMAT_VERSION,
            "session_id": session_id,
            "config_hash": _config_hash(config, config_hash),
            "token_count": token_count,
            "experts": list(memory_states),
            "num_layers": {name: len(layers) for name, layers in memory_states.items()},
            "batch_size": batch.pop() if len(batch) == 1 else None,
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "created": created,
            "updated": now,
            **(extra or {}),
        }
        self.base_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{session_id}.", dir=self.base_dir))
        try:
            save_file(flat, str(tmp / STATE_NAME), metadata={"session_id": session_id})
            (tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
            if target.exists():  # rename the old one away first: os.replace cannot replace a non-empty dir
                old = Path(tempfile.mkdtemp(prefix=f".{session_id}.old.", dir=self.base_dir))
                os.replace(target, old / "s")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def load_metadata(self, session_id: str) -> dict:
        folder = self.session_dir(session_id)
        meta_path = folder / METADATA_NAME
        if not meta_path.is_file():
            known = ", ".join(self.list_sessions()[:10]) or "none"
            raise UserError(f"session {session_id!r} not found in {self.base_dir} (sessions: {known})")
        try:
            metadata = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"session {session_id!r} is corrupt: {meta_path} is unreadable ({e}); "
                            "delete it and start a new session") from None
        if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
            raise UserError(f"session {session_id!r}: {meta_path} is not an MM-Rec session (format_version "
                            f"{metadata.get('format_version') if isinstance(metadata, dict) else '?'})")
        return metadata

    def load_state(self, session_id: str, device="cpu", config=None, config_hash: str | None = None) -> dict:
        """The stored memory states on `device`; with config (or config_hash), refuse another model's state."""
        from safetensors.torch import load_file
        metadata = self.load_metadata(session_id)
        expected = _config_hash(config, config_hash)
        if expected is not None and metadata.get("config_hash") not in (None, expected):
            raise UserError(f"session {session_id!r} was saved by a different model (config hash "
                            f"{metadata.get('config_hash')}, this model {expected}); start a new session")
        state_path = self.session_dir(session_id) / STATE_NAME
        try:
            flat = load_file(str(state_path), device=str(device))
            states = unflatten_states(flat)
        except Exception as e:  # missing or truncated file, foreign keys
            raise UserError(f"session {session_id!r} is corrupt: {state_path} cannot be read "
                            f"({type(e).__name__}); delete it and start a new session") from None
        if sorted(states) != sorted(metadata.get("experts", [])):
            raise UserError(f"session {session_id!r} is corrupt: its state holds experts {sorted(states)}, "
                            f"its metadata {metadata.get('experts')}")
        if config is not None:
            self._check_shapes(session_id, states, config)
        return states

    @staticmethod
    def _check_shapes(session_id: str, states: dict, config) -> None:
        d, H, Dh = config.expert_dim, config.num_heads, config.head_dim
        for expert, layers in states.items():
            if expert not in config.expert_names or len(layers) != config.num_layers:
                raise UserError(f"session {session_id!r} does not fit this model (expert {expert!r}, "
                                f"{len(layers)} layers); start a new session")
            for layer in layers:
                h, M = layer.get("h"), layer.get("M")
                if h is None or M is None or h.shape[1:] != (d,) or M.shape[1:] != (H, Dh, Dh):
                    raise UserError(f"session {session_id!r} has state shapes that do not fit this model; "
                                    "start a new session")

    def list_sessions(self) -> list[str]:
        if not self.base_dir.is_dir():
            return []
        return sorted(p.name for p in self.base_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / METADATA_NAME).is_file())

    def delete_session(self, session_id: str) -> None:
        folder = self.session_dir(session_id)
        if not folder.is_dir():
            raise UserError(f"session {session_id!r} not found in {self.base_dir}")
        shutil.rmtree(folder)
