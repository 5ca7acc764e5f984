"""The HTTP API: OpenAI's completions, chat completions and models endpoints, plus sessions.

    POST /v1/completions        POST /v1/chat/completions     GET /v1/models    GET /health
    GET /v1/sessions/{id}       DELETE /v1/sessions/{id}

A request's turn: check it (400 / 404 / 413 / 429 / 503, in OpenAI's error JSON), take its
session's lock (one turn at a time per session), load the session's state, hand the prompt to the
engine (continuous batching, engine.py), stream or collect the tokens, save the session's new state
and only then answer the end of the turn. A client that goes away cancels its row at once; the
session then stays as it was before the turn.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..utils.errors import UserError
from ..utils.fileio import disk_error
from .engine import Engine, EngineUnavailable, Finished, Request, SamplingParams
from .schemas import APIError, ChatCompletionRequest, CompletionRequest, error_body, render_chat
from .session_store import SessionStore

log = logging.getLogger("mm_rec.serving")

SESSION_HEADER = "X-Session-Id"


@dataclass
class ServerSettings:
    model_name: str = "mm-rec"
    max_prompt_tokens: int = 131072
    max_tokens: int = 4096            # the largest max_tokens a request may ask for
    max_concurrent: int = 256         # requests in flight (generating or waiting for their session)
    log_prompts: bool = False


class Turn:
    """One request from admission to cleanup (see the module docstring)."""

    def __init__(self, server: "Server", body, prompt, chat: bool, http: HTTPRequest):
        self.server, self.body, self.prompt, self.chat = server, body, prompt, chat
        self.session_id = body.session_id or http.headers.get(SESSION_HEADER)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.request: Request | None = None
        self.finished: Finished | None = None
        self._counted = self._locked = False
        self._turn_lock = None
        self._seen = 0
        self._start = time.perf_counter()

    async def begin(self) -> None:
        server, body = self.server, self.body
        body.check(server.settings.max_tokens)
        if body.model != server.settings.model_name:
            raise APIError(404, f"model {body.model!r} not found; this server serves "
                                f"{server.settings.model_name!r}", "model", "model_not_found")
        if getattr(body, "echo", False) or body.logprobs:
            raise APIError(400, "echo and logprobs are not supported by this server", "logprobs")
        if self.session_id is not None:
            try:
                SessionStore.validate(self.session_id)
            except UserError as e:
                raise APIError(400, str(e), "session_id", "invalid_session_id") from None
        if not server.engine.ready:
            raise APIError(503, "the model is not ready (starting up, shutting down or failed: see /health); "
                                "retry shortly", code="engine_unavailable")
        if server.in_flight >= server.settings.max_concurrent:
            raise APIError(429, f"too many concurrent requests (limit {server.settings.max_concurrent}); "
                                "retry later", code="too_many_requests")
        server.in_flight += 1
        self._counted = True
        state = None
        if self.session_id is not None:
            self._turn_lock = server.store.turn(self.session_id)
            await self._turn_lock.__aenter__()
            self._locked = True
            try:
                state, self._seen = await server.store.load(self.session_id)
            except UserError as e:
                raise APIError(400, str(e), "session_id", "invalid_session") from None
        limit = server.settings.max_prompt_tokens
        chars = len(self.prompt) if isinstance(self.prompt, str) else 0
        if chars > 64 * limit:  # surely over the limit: refused before any tokenizing
            raise APIError(413, f"the prompt has {chars} characters, far over this server's limit of {limit} "
                                "tokens", "prompt", "prompt_too_long")
        if chars > 20000:  # a long text is tokenized off the event loop
            ids = await asyncio.to_thread(self._prompt_ids, state is None)
        else:
            ids = self._prompt_ids(fresh=state is None)
        if len(ids) > limit:
            raise APIError(413, f"the prompt has {len(ids)} tokens, over this server's limit of "
                                f"{server.settings.max_prompt_tokens}", "prompt", "prompt_too_long")
        max_tokens = body.max_tokens
        if self.chat and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
            if not 0 <= max_tokens <= server.settings.max_tokens:
                raise APIError(400, f"max_completion_tokens must be in 0..{server.settings.max_tokens}",
                               "max_completion_tokens")
        if max_tokens is None:
            max_tokens = min(server.settings.max_tokens, 256)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=body.seed, stop=tuple(body.stop_list()),
                                  ignore_eos=body.ignore_eos)
        self.request = Request(ids, body.expert, sampling, asyncio.get_running_loop(), state=state,
                               keep_state=self.session_id is not None, id=self.id)
        try:
            server.engine.submit(self.request)
        except EngineUnavailable:
            raise APIError(503, "the model is shutting down; retry on another server", code="engine_unavailable")
        if server.settings.log_prompts:
            log.info("%s session=%s prompt=%r", self.id, self.session_id, self.prompt)
        else:
            log.info("%s session=%s prompt_tokens=%d max_tokens=%d", self.id, self.session_id, len(ids), max_tokens)

    def _prompt_ids(self, fresh: bool) -> list[int]:
        tokenizer, vocab = self.server.tokenizer, self.server.vocab_size
        prompt = self.prompt
        if self.chat:  # a continued session's turn starts on a new paragraph (schemas.render_chat)
            prompt = render_chat(prompt, continues_session=not fresh)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (send a string, not a list of strings)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
            # A fresh context starts like every training document: right after an end-of-text token.
            ids = [tokenizer.eot_id] + ids if fresh else ids
        else:
            ids = list(prompt)  # token ids, taken as they are
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty; a session turn needs at least one token", "prompt")
        return ids

    async def events(self):
        """The engine's events, in lists of whatever has arrived (one write per list when
        streaming); on "done" the session is saved before it is passed on."""
        queue = self.request.events
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            out = []
            for event in batch:
                kind = event[0]
                if kind == "token":
                    out.append(event)
                elif kind == "done":
                    await self._done(event[1])
                    out.append(event)
                    yield out
                    return
                elif kind == "cancelled":
                    return
                else:
                    status = event[2] if len(event) > 2 else 503
                    raise APIError(status, event[1], code="engine_unavailable" if status == 503 else None)
            yield out

    async def _done(self, finished: Finished) -> None:
        if self.session_id is not None:
            total = self._seen + finished.prompt_tokens + finished.completion_tokens
            try:
                await self.server.store.save(self.session_id, finished.state, total)
            except Exception as e:  # a full or read-only disk: the session stays as it was before the turn
                if isinstance(e, OSError):
                    e = disk_error(e, self.server.store.manager.base_dir, "save the session") or e
                reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                log.error("%s: session %s not saved: %s", self.id, self.session_id, reason)
                raise APIError(500, f"the session could not be saved ({reason}); it is as it was before this "
                                    "turn", "session_id", "session_not_saved") from None
        self.finished = finished
        log.info("%s done: %s, %d tokens in %.3fs", self.id, finished.reason, finished.completion_tokens,
                 time.perf_counter() - self._start)

    def cancel(self) -> None:
        if self.request is not None and self.finished is None and not self.request.cancelled:
            self.server.engine.cancel(self.request)
            self.request.events.put_nowait(("cancelled",))

    async def close(self) -> None:
        self.cancel()
        if self._locked:
            self._locked = False
            await self._turn_lock.__aexit__(None, None, None)
        if self._counted:
            self._counted = False
            self.server.in_flight -= 1

    # -- OpenAI's JSON -------------------------------------------------------------------------------
    def usage(self) -> dict:
        f = self.finished
        return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens}

    def _head(self, obj: str) -> dict:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.server.settings.model_name}
        if self.session_id is not None:
            head["session_id"] = self.session_id
        return head

    def response(self) -> dict:
        f = self.finished
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": f.text}, "logprobs": None,
                      "finish_reason": f.reason}
        else:
            choice = {"index": 0, "text": f.text, "logprobs": None, "finish_reason": f.reason}
        if self.body.return_token_ids:
            choice["token_ids"] = f.token_ids
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": self.usage()}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None and self.body.return_token_ids:
            choice["token_ids"] = self.finished.token_ids
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def _token_chunk_template(self) -> tuple[str, str]:
        """A token chunk's SSE line around its JSON-encoded text: built once per turn, so a token
        costs one json.dumps of its text (at 30K tokens/s the event loop's budget is ~30 us)."""
        marker = "\x00TEXT\x00"
        line = f"data: {json.dumps(self.chunk(marker))}\n\n"
        before, after = line.split(json.dumps(marker))
        return before, after

    async def sse(self):
        """Server-sent events in OpenAI's chunk format (one per token), then the finish chunk, a
        usage chunk and [DONE]."""
        def data(obj) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()
        before, after = self._token_chunk_template()
        try:
            if self.chat:
                yield data(self.chunk(None, role=True))
            async for batch in self.events():
                lines = [before + json.dumps(e[1]) + after for e in batch if e[0] == "token"]
                if lines:
                    yield "".join(lines).encode()
            if self.finished is None:
                return  # cancelled
            yield data(self.chunk(None, self.finished.reason))
            options = self.body.stream_options
            if options is None or options.include_usage:
                yield data({**self._head(self.chunk(None)["object"]), "choices": [], "usage": self.usage()})
            yield b"data: [DONE]\n\n"
        except APIError as e:  # mid-stream: the status is sent already, so the error goes in the stream
            yield data(e.body())
            yield b"data: [DONE]\n\n"


class TurnStreamingResponse(StreamingResponse):
    """A StreamingResponse that cancels the turn's row the moment the client disconnects and always
    releases the turn (its session lock, its concurrency slot), however the response ends."""

    def __init__(self, turn: Turn):
        headers = {SESSION_HEADER: turn.session_id} if turn.session_id else None
        super().__init__(turn.sse(), media_type="text/event-stream", headers=headers)
        self.turn = turn

    async def __call__(self, scope, receive, send):
        async def watch():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.turn.cancel()
                    return
        watcher = asyncio.ensure_future(watch())
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            await self.turn.close()


class Server:
    """What the endpoints share: the engine, the sessions, the tokenizer, the limits."""

    def __init__(self, engine: Engine, store: SessionStore, settings: ServerSettings):
        self.engine, self.store, self.settings = engine, store, settings
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model.config.vocab_size
        self.in_flight = 0

    async def serve(self, http: HTTPRequest, body, prompt, chat: bool) -> Response:
        turn = Turn(self, body, prompt, chat, http)
        try:
            # (waiting for its session's previous turn, a client may give up: then nothing runs)
            started = await _until_disconnected(turn.begin(), http)
        except BaseException:
            await turn.close()
            raise
        if not started:
            await turn.close()
            return Response(status_code=499)
        if body.stream:
            return TurnStreamingResponse(turn)
        try:
            completed = await _until_disconnected(self._collect(turn), http)
        finally:
            await turn.close()
        if not completed:
            return Response(status_code=499)  # nobody is listening; the row is freed already
        headers = {SESSION_HEADER: turn.session_id} if turn.session_id else None
        return JSONResponse(turn.response(), headers=headers)

    @staticmethod
    async def _collect(turn: Turn) -> None:
        async for _ in turn.events():
            pass

    def health(self) -> dict:
        engine, store = self.engine, self.store
        status = ("ok" if engine.ready else "failed" if engine.failed else
                  "shutting_down" if engine.closing else "starting")
        out = {"status": status, "model": self.settings.model_name, "device": str(engine.device),
               "vocab_size": self.vocab_size,
               "in_flight": self.in_flight, "decoding_rows": engine.active_rows,
               "prefilling": len(engine.prefilling), "decode_steps": engine.steps,
               "cuda_graphs": getattr(engine.step, "graphed", False), "hot_sessions": len(store.hot),
               "hot_session_bytes": store.hot_bytes, "process_rss_bytes": _rss_bytes()}
        if engine.device.type == "cuda":
            out["device_memory_allocated_bytes"] = torch.cuda.memory_allocated(engine.device)
            out["device_memory_reserved_bytes"] = torch.cuda.memory_reserved(engine.device)
        return out


async def _until_disconnected(coro, http: HTTPRequest, poll: float = 0.05) -> bool:
    """Run coro to the end (True); if the client disconnects first, cancel it (False)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                task.result()
                return True
            if await http.is_disconnected():
                return False
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _rss_bytes() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def create_app(engine: Engine, store: SessionStore, settings: ServerSettings | None = None,
               warmup_batch_sizes=(1,)) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine (capturing the decode graphs on CUDA) and
    stops it at shutdown."""
    settings = settings or ServerSettings()
    server = Server(engine, store, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.ready:
            await asyncio.to_thread(engine.start, warmup_batch_sizes)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="MM-Rec", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return JSONResponse(error_body(422, message, param, "validation_error"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(error_body(500, "internal server error; see the server log"), status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await server.serve(http, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        return await server.serve(http, body, body.messages, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "mm-rec"}]}

    @app.get("/health")
    async def health():
        info = server.health()
        return JSONResponse(info, status_code=200 if engine.ready else 503)

    def _session_id(session_id: str) -> str:
        try:
            return SessionStore.validate(session_id)
        except UserError as e:
            raise APIError(400, str(e), "session_id", "invalid_session_id") from None

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str):
        session_id = _session_id(session_id)
        try:
            meta = await store.info(session_id)
        except UserError as e:
            raise APIError(400, str(e), "session_id", "invalid_session") from None
        if meta is None:
            raise APIError(404, f"session {session_id!r} not found", "session_id", "session_not_found")
        return {"id": session_id, "object": "session", "token_count": meta.get("token_count"),
                "experts": meta.get("experts"), "created": meta.get("created"), "updated": meta.get("updated"),
                "hot": session_id in store.hot}

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        session_id = _session_id(session_id)
        async with store.turn(session_id):  # not in the middle of a turn
            deleted = await store.delete(session_id)
        if not deleted:
            raise APIError(404, f"session {session_id!r} not found", "session_id", "session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    return app
