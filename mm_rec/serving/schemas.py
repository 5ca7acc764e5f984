"""OpenAI's wire format: request bodies (types only: a wrong type is a 422, a value out of range a
400, as OpenAI's own API answers), the chat prompt template and the error JSON."""
from __future__ import annotations

import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# -- errors -------------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error"}


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


# -- requests -----------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = True


class _Common(BaseModel):
    # Fields of OpenAI's API that are not listed here (user, presence_penalty, ...) are ignored.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None          # not in OpenAI's API; as vLLM names it
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    expert: Literal["text", "code", "fused"] = "fused"
    session_id: str | None = None     # or the X-Session-Id header
    return_token_ids: bool = False    # add the generated token ids to the choice (as vLLM does)
    ignore_eos: bool = False          # go on after end-of-text (as vLLM names it; for benchmarks)

    def check(self, max_tokens_limit: int) -> None:
        """Values out of range -> 400 naming the field."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise APIError(400, f"temperature must be a finite number >= 0, got {self.temperature}", "temperature")
        if self.top_p is not None and (not math.isfinite(self.top_p) or not 0 < self.top_p <= 1):
            raise APIError(400, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < 1:
            raise APIError(400, f"top_k must be >= 1, got {self.top_k}", "top_k")
        if self.max_tokens is not None and not 0 <= self.max_tokens <= max_tokens_limit:
            raise APIError(400, f"max_tokens must be in 0..{max_tokens_limit} (this server's limit), "
                                f"got {self.max_tokens}", "max_tokens")
        if self.n != 1:
            raise APIError(400, f"n must be 1 (one completion per request), got {self.n}", "n")
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int]] = Field(...)
    max_tokens: int | None = 16       # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


# -- the chat template ----------------------------------------------------------------------------------
# The model is not chat-tuned: a conversation is shown to it as a plain-text transcript and it
# continues the text after "Assistant:". Each message is "<Role>: <content>" followed by a blank
# line; a turn that continues a session starts with a blank line (the previous reply ended wherever
# the model stopped).

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_chat(messages: list[ChatMessage], continues_session: bool) -> str:
    text = "".join(f"{ROLE_NAMES[m.role]}: {m.text()}\n\n" for m in messages) + "Assistant:"
    return ("\n\n" + text) if continues_session else text
