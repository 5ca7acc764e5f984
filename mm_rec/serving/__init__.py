"""An OpenAI-compatible server with per-session recurrent memory and continuous batching.

    python -m mm_rec.scripts.serve --checkpoint PATH

app.py (HTTP endpoints), engine.py (continuous batching over one model), session_store.py
(sessions on disk + hot on the device), schemas.py (OpenAI's request and error formats).
"""
from .app import ServerSettings, create_app
from .engine import Engine, SamplingParams
from .session_store import SessionStore

__all__ = ["create_app", "ServerSettings", "Engine", "SamplingParams", "SessionStore"]
