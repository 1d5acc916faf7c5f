"""The OpenAI-compatible API, as data: request models, the predictor's replies, response bodies,
server-sent event chunks and error bodies. No I/O: the gateway's front (cirrus/gateway/openai.py)
and the replica's side (cirrus/replica/openai.py) use these.

A request is validated here (400 with OpenAI's error body naming the field). The predictor answers
with plain values (`reply_of` reads them) and this module shapes what the `openai` SDK parses.
"""

from __future__ import annotations

import base64
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENDPOINTS = {"embeddings": "embed", "chat": "chat", "completions": "complete"}  # operation -> predictor method
PATHS = {"/embeddings": "embeddings", "/chat/completions": "chat", "/completions": "completions"}
DONE = "data: [DONE]\n\n"
FINISH_REASONS = ("stop", "length", "content_filter", "tool_calls")


# --- errors ----------------------------------------------------------------------------------------


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or error_type(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status."""
    if status in (401,):
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def as_openai_error(status: int, body: Any) -> dict[str, Any]:
    """A Cirrus error body (`{"error": "...", "request_id"}`) in OpenAI's shape; one already so is kept."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str):
        message = f"HTTP {status}"
    code = {429: "rate_limit_exceeded", 503: "overloaded", 504: "timeout", 413: "request_too_large"}.get(status)
    if status == 401:
        code = "invalid_api_key"
    return error_body(message, error_type(status), None, code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model {model!r} does not exist", "model", "model_not_found")


def _validation_error(exc: ValidationError) -> OpenAIError:
    first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return OpenAIError(400, f"{param}: {message}" if param else message, param, first["type"])


# --- requests --------------------------------------------------------------------------------------


class _Request(BaseModel):
    """What every endpoint takes; fields Cirrus does not know pass through to the predictor's `params`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    user: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """A list of content parts becomes one string: only text parts are supported."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError('only text content parts are supported ({"type": "text", "text": "..."})')
            texts.append(part["text"])
        return "".join(texts)


class _Generation(_Request):
    """The fields chat and completions share."""

    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def params(self) -> dict[str, Any]:
        """The sampling fields the client gave (and unknown ones), for the predictor."""
        skip = {"model", "messages", "prompt", "stream", "stream_options", "n"}
        return self.model_dump(exclude_unset=True, exclude_none=True, exclude=skip)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


class CompletionRequest(_Generation):
    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if any(not isinstance(p, str) for p in value):
                raise ValueError("token-id prompts are not supported: send the prompt as text")
            if len(value) != 1:
                raise ValueError("one prompt per request (send a string, or a list of one string)")
            return value[0]
        return value


class EmbeddingRequest(_Request):
    input: list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            if not value:
                raise ValueError("input must not be empty")
            if any(not isinstance(t, str) for t in value):
                raise ValueError("token-id inputs are not supported: send strings")
            if len(value) > 2048:
                raise ValueError("at most 2048 inputs per request")
        return value

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions is not supported: the predictor's model sets the size of its vectors")
        return value


REQUESTS: dict[str, type[_Request]] = {
    "embeddings": EmbeddingRequest,
    "chat": ChatRequest,
    "completions": CompletionRequest,
}


def parse_request(operation: str, body: Any) -> Any:
    """The validated request of an operation ("embeddings", "chat", "completions"); OpenAIError 400."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return REQUESTS[operation].model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    except RecursionError:
        raise OpenAIError(400, "JSON nested too deeply") from None


# --- the predictor's replies -----------------------------------------------------------------------


class BadReply(Exception):
    """The predictor answered in a shape this protocol cannot carry (a bug of the predictor: a 500)."""


@dataclass
class Reply:
    """A chat or completion answer: its text, why it ended, and the token counts when reported."""

    content: str = ""
    finish_reason: str = "stop"
    usage: dict[str, int] | None = None


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def ending_of(value: dict[str, Any], method: str) -> tuple[str | None, str | None, dict[str, int] | None]:
    """(content, finish_reason, usage) of a predictor's dict reply; BadReply when malformed."""
    content = value.get("content")
    if content is not None and not isinstance(content, str):
        raise BadReply(f"{method} returned a dict whose content is a {type(content).__name__}, not a str")
    finish = value.get("finish_reason")
    if finish is not None and finish not in FINISH_REASONS:
        raise BadReply(f"{method} returned finish_reason {finish!r}; use one of {', '.join(FINISH_REASONS)}")
    usage = value.get("usage")
    counted = None
    if usage is not None:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            raise BadReply(f"{method} returned usage without integer prompt_tokens and completion_tokens")
        counted = usage_of(prompt, completion)
    return content, finish, counted


def reply_of(value: Any, method: str) -> Reply:
    """A non-streamed reply: a str, or a dict {"content", "finish_reason"?, "usage"?}."""
    if isinstance(value, str):
        return Reply(value)
    if isinstance(value, dict):
        content, finish, usage = ending_of(value, method)
        return Reply(content or "", finish or "stop", usage)
    raise BadReply(
        f"{method} returned a {type(value).__name__}; return a str, a dict with content "
        "(and optionally finish_reason, usage), or a generator of str pieces"
    )


def joined(items: list[Any], method: str) -> Reply:
    """The reply of a generator's items (str pieces, maybe a last dict), for a request not streamed."""
    reply = Reply()
    pieces = []
    for item in items:
        if isinstance(item, str):
            pieces.append(item)
            continue
        if not isinstance(item, dict):
            raise BadReply(f"{method} yielded a {type(item).__name__}; yield str pieces (and maybe a last dict)")
        content, finish, usage = ending_of(item, method)
        pieces.append(content or "")
        reply.finish_reason = finish or reply.finish_reason
        reply.usage = usage or reply.usage
    reply.content = "".join(pieces)
    return reply


def embeddings_of(value: Any, count: int) -> tuple[list[Any], list[int] | None]:
    """(one vector per text, token counts or None) from what `embed` returned for `count` texts."""
    tokens = None
    if isinstance(value, dict):
        tokens = value.get("tokens")
        if tokens is not None and (
            not isinstance(tokens, list) or len(tokens) != count or any(not isinstance(t, int) for t in tokens)
        ):
            raise BadReply(f"embed returned tokens that are not a list of {count} integers (one per text)")
        value = value.get("data")
    if value is None or isinstance(value, str | bytes | dict) or not hasattr(value, "__len__"):
        raise BadReply(
            f"embed returned a {type(value).__name__}; return a list (or 2-D array) of vectors, one per text, "
            'or {"data": vectors, "tokens": [int per text]}'
        )
    if len(value) != count:
        raise BadReply(f"embed returned {len(value)} vectors for {count} texts; return one per text, in order")
    return list(value), tokens


# --- responses -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def encode_vector(vector: Any, encoding_format: str) -> Any:
    """A vector as the response carries it: a list of floats, or base64 of little-endian float32s."""
    if encoding_format != "base64":
        return vector.tolist() if hasattr(vector, "tolist") else [float(x) for x in vector]
    if hasattr(vector, "astype"):  # numpy
        raw = vector.astype("<f4").tobytes()
    else:
        from array import array

        floats = array("f", (float(x) for x in vector))
        if sys.byteorder == "big":
            floats.byteswap()
        raw = floats.tobytes()
    return base64.b64encode(raw).decode("ascii")


def embeddings_response(
    model: str, vectors: list[Any], tokens: list[int] | None, encoding_format: str
) -> dict[str, Any]:
    prompt_tokens = sum(tokens) if tokens is not None else 0
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def chat_response(model: str, reply: Reply) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": reply.finish_reason,
                "logprobs": None,
            }
        ],
    }
    if reply.usage is not None:
        body["usage"] = reply.usage
    return body


def completion_response(model: str, reply: Reply) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": reply.content, "finish_reason": reply.finish_reason, "logprobs": None}],
    }
    if reply.usage is not None:
        body["usage"] = reply.usage
    return body


def model_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "cirrus"}


def models_list(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": entries}


# --- streams ---------------------------------------------------------------------------------------


def sse(value: dict[str, Any], encode: Any) -> str:
    """One server-sent event carrying `value` as JSON (`encode`: value -> bytes)."""
    return "data: " + encode(value).decode() + "\n\n"


class StreamShaper:
    """The SSE events of one streamed chat (`chat.completion.chunk`) or completion (`text_completion`):
    a first chunk (chat: the assistant's role), one per piece, a last with finish_reason, a usage chunk
    when asked for (`stream_options.include_usage`), then `data: [DONE]`."""

    def __init__(self, operation: str, model: str, include_usage: bool, encode: Any) -> None:
        self.chat = operation == "chat"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.encode = encode
        self.finish_reason = "stop"
        self.usage: dict[str, int] | None = None

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    def start(self) -> str | None:
        """The first event (chat: the role); None for a completion."""
        return sse(self._chunk([self._choice("", None, role=True)]), self.encode) if self.chat else None

    def item(self, item: Any, method: str) -> str | None:
        """The event of one item the predictor yielded (a str piece, or a dict ending); None: no event."""
        if isinstance(item, str):
            return sse(self._chunk([self._choice(item, None)]), self.encode) if item else None
        if not isinstance(item, dict):
            raise BadReply(f"{method} yielded a {type(item).__name__}; yield str pieces (and maybe a last dict)")
        content, finish, usage = ending_of(item, method)
        self.finish_reason = finish or self.finish_reason
        self.usage = usage or self.usage
        return sse(self._chunk([self._choice(content, None)]), self.encode) if content else None

    def end(self) -> list[str]:
        """The last events: finish_reason, usage (when asked for and reported), [DONE]."""
        events = [sse(self._chunk([self._choice(None if self.chat else "", self.finish_reason)]), self.encode)]
        if self.include_usage:
            usage = self.usage or usage_of(0, 0)
            events.append(sse({**self._chunk([]), "usage": usage}, self.encode))
        events.append(DONE)
        return events

    def error(self, status: int, message: str) -> list[str]:
        """A failure mid-stream: an error event, then the stream ends (no [DONE])."""
        return [sse(error_body(message, error_type(status), None, None), self.encode)]
