"""The server's sessions: saved on disk by SessionMemoryManager, the recently used ones also kept on
the device (an LRU), and one turn at a time per session.

- load(id): the state after the session's last turn (from the LRU, else from disk), or None for a
  new session.
- save(id, state, token_count): written atomically to disk first (a kill -9 after it loses
  nothing), then kept hot. The server answers a turn only after its save.
- lock(id): an asyncio.Lock per session id. Two requests on one session are served one after the
  other, in arrival order (each continues from the state the previous one left): a recurrent state
  cannot take two turns at once.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict

import torch

from ..inference.sessions import SessionMemoryManager, validate_session_id
from ..inference.state import RecurrentState


class SessionStore:
    def __init__(self, session_dir, model, device, max_hot: int = 512):
        self.manager = SessionMemoryManager(session_dir)
        self.config = model.config
        self.device = torch.device(device)
        self.max_hot = max_hot
        self.hot: OrderedDict[str, tuple[RecurrentState, int]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @staticmethod
    def validate(session_id: str) -> str:
        return validate_session_id(session_id)  # UserError on an id that could leave the directory

    # -- one turn at a time ---------------------------------------------------------------------------
    class _Turn:
        def __init__(self, store, session_id):
            self.store, self.id = store, session_id

        async def __aenter__(self):
            store = self.store
            lock = store._locks.setdefault(self.id, asyncio.Lock())
            store._users[self.id] = store._users.get(self.id, 0) + 1
            try:
                await lock.acquire()
            except BaseException:
                self._release_user()
                raise
            return self

        async def __aexit__(self, *exc):
            self.store._locks[self.id].release()
            self._release_user()

        def _release_user(self):
            store = self.store
            store._users[self.id] -= 1
            if store._users[self.id] == 0:  # nobody waiting: forget the lock (ids are unbounded)
                del store._users[self.id]
                del store._locks[self.id]

    def turn(self, session_id: str) -> "_Turn":
        return self._Turn(self, session_id)

    # -- state ------------------------------------------------------------------------------------------
    async def load(self, session_id: str) -> tuple[RecurrentState | None, int]:
        """(state on the device, tokens of context) or (None, 0) for a session not seen before."""
        if session_id in self.hot:
            self.hot.move_to_end(session_id)
            return self.hot[session_id]
        return await asyncio.to_thread(self._load_from_disk, session_id)

    def _load_from_disk(self, session_id: str):
        if not self.manager.exists(session_id):
            return None, 0
        states = self.manager.load_state(session_id, device=self.device, config=self.config)
        tokens = self.manager.load_metadata(session_id).get("token_count") or 0
        state = RecurrentState.from_memory_states(states)
        # the model's expert order (a file keeps its keys sorted)
        return RecurrentState({n: state.experts[n] for n in self.config.expert_names if n in state.experts}), tokens

    async def save(self, session_id: str, state: RecurrentState, token_count: int) -> None:
        state = await asyncio.to_thread(self._save_to_disk, session_id, state, token_count)
        self._keep_hot(session_id, state, token_count)

    def _save_to_disk(self, session_id: str, state: RecurrentState, token_count: int) -> RecurrentState:
        """The state, compacted (a turn's state can be a view of its whole decode batch's copy,
        which the LRU would keep alive), after it is written."""
        state = state.compact()
        self.manager.serialize_state(session_id, state.to_memory_states(), token_count=token_count,
                                     config=self.config)
        return state

    def _keep_hot(self, session_id, state, token_count) -> None:
        if self.max_hot <= 0:
            return
        self.hot[session_id] = (state, token_count)
        self.hot.move_to_end(session_id)
        while len(self.hot) > self.max_hot:
            self.hot.popitem(last=False)

    async def info(self, session_id: str) -> dict | None:
        def read():
            if not self.manager.exists(session_id):
                return None
            return self.manager.load_metadata(session_id)
        return await asyncio.to_thread(read)

    async def delete(self, session_id: str) -> bool:
        self.hot.pop(session_id, None)
        def remove():
            if not self.manager.exists(session_id):
                return False
            self.manager.delete_session(session_id)
            return True
        return await asyncio.to_thread(remove)

    @property
    def hot_bytes(self) -> int:
        return sum(state.nbytes for state, _ in self.hot.values())
