"""A tiny chat model served through the OpenAI-compatible endpoints, offline on CPU.

The model is a two-layer GPT-2 (transformers' `GPT2LMHeadModel`, about 120 thousand parameters)
over a character vocabulary (printable ASCII, a newline and an end-of-turn token), trained for
a few minutes on the small text in `corpus.txt` by `train.py`, which writes `weights.safetensors`
(committed, under 300 KB). Its prose is barely English: the example is about the protocol (OpenAI's chat and
completions, `usage`, `stream: true` token by token), not the model.

Cirrus calls `chat(messages, params)` for `POST /v1/chat/completions` and `complete(prompt, params)`
for `POST /v1/completions`. Both return a generator: the text piece by piece as it is sampled (one
character per token), then a final dict with `finish_reason` ("stop" at the end-of-turn token or a
stop sequence, "length" at `max_tokens`) and `usage` (one token per character). `params` holds the
request's sampling fields: `max_tokens`, `temperature` (0: greedy), `top_p`, `stop`, `seed`.

torch and transformers are imported at module top (Cirrus imports the module once per revision in a
template process and forks replicas from it); no torch op runs at import time, and `__init__` sets
the thread count before building the model.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

try:
    from cirrus import HTTPError  # a 4xx for the client instead of a 500
except ImportError:  # running outside the platform (train.py, a notebook)

    class HTTPError(Exception):  # type: ignore[no-redef]
        def __init__(self, status: int, message: str) -> None:
            super().__init__(message)
            self.status = status


HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights.safetensors"

# The vocabulary: token 0 ends a turn, then the newline and the printable ASCII characters.
END = 0
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = 1 + len(CHARS)
CONTEXT = 256  # positions the model sees; a longer prompt keeps its last CONTEXT - 1 characters
_INDEX = {ch: i + 1 for i, ch in enumerate(CHARS)}
_UNKNOWN = _INDEX["?"]

MAX_TOKENS_LIMIT = 1024  # the most `max_tokens` a request may ask for
MAX_STOP_SEQUENCES = 4  # as OpenAI's API


def encode(text: str) -> list[int]:
    """One token per character; characters outside printable ASCII read as '?'."""
    return [_INDEX.get(ch, _UNKNOWN) for ch in text]


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i - 1] for i in ids if i != END)


def build_model() -> GPT2LMHeadModel:
    """The untrained network (train.py trains it; the predictor loads its weights)."""
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=CONTEXT,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=END,
        eos_token_id=END,
        pad_token_id=END,
    )
    return GPT2LMHeadModel(config)


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    """`role: content` lines, then the assistant's turn to speak (the format corpus.txt trains on)."""
    lines = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        lines.append(f"{message.get('role', 'user')}: {' '.join(str(content).split())}")
    return "\n".join(lines) + "\nassistant: "


def sampling(params: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """The request's sampling fields, checked (HTTPError 400 when one is out of range)."""
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        max_tokens = params.get("max_completion_tokens")
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise HTTPError(400, f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}")
    temperature = 1.0 if params.get("temperature") is None else params["temperature"]
    top_p = 1.0 if params.get("top_p") is None else params["top_p"]
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise HTTPError(400, "temperature must be a number from 0 to 2")
    if not isinstance(top_p, int | float) or not 0 <= top_p <= 1:
        raise HTTPError(400, "top_p must be a number from 0 to 1")
    stop = params.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stop):
        raise HTTPError(400, f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings")
    seed = params.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise HTTPError(400, "seed must be an integer")
    return {
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "stop": stop,
        "seed": seed,
    }


def _held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop sequence (not sent yet)."""
    longest = 0
    for sequence in stop:
        for size in range(min(len(sequence) - 1, len(text)), longest, -1):
            if text.endswith(sequence[:size]):
                longest = size
                break
    return longest


class Predictor:
    def __init__(self, config: dict[str, Any]) -> None:
        torch.set_num_threads(int(config.get("torch_threads", 1)))
        self.default_max_tokens = int(config.get("max_tokens", 128))
        self.model = build_model()
        path = str(config.get("weights_path") or WEIGHTS)
        weights = {name: tensor.float() for name, tensor in load_file(path).items()}
        refused = f"{path} does not fit this model: retrain it with examples/tiny-chat/train.py"
        try:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
        except RuntimeError as exc:  # a tensor of another shape
            raise RuntimeError(refused) from exc
        if unexpected or set(missing) - {"lm_head.weight"}:  # the output layer is not saved: it is tied
            raise RuntimeError(refused)
        self.model.tie_weights()  # the output layer is the (loaded) token embedding
        self.model.eval()

    def chat(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> Iterator[Any]:
        return self.generate(chat_prompt(messages), params)

    def complete(self, prompt: str, params: dict[str, Any]) -> Iterator[Any]:
        return self.generate(prompt, params)

    def predict(self, payload: Any) -> dict[str, Any]:
        """`POST /tiny-chat`: {"prompt": "..."} or {"messages": [...]}, plus sampling fields;
        answers {"text", "finish_reason", "usage"} at once (the OpenAI endpoints stream)."""
        if not isinstance(payload, dict) or not ("prompt" in payload or "messages" in payload):
            raise HTTPError(400, 'expected {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}]}')
        params = {k: v for k, v in payload.items() if k not in ("prompt", "messages")}
        if "messages" in payload:
            if not isinstance(payload["messages"], list) or not all(isinstance(m, dict) for m in payload["messages"]):
                raise HTTPError(400, '"messages" must be a list of {"role", "content"} objects')
            pieces = self.chat(payload["messages"], params)
        else:
            if not isinstance(payload["prompt"], str):
                raise HTTPError(400, '"prompt" must be a string')
            pieces = self.complete(payload["prompt"], params)
        text, last = [], {}
        for piece in pieces:
            if isinstance(piece, str):
                text.append(piece)
            else:
                last = piece
        return {"text": "".join(text), **last}

    def generate(self, prompt: str, params: dict[str, Any]) -> Iterator[Any]:
        """Checks the parameters now (a 400 before any token), then returns the token stream."""
        return self._stream(encode(prompt), sampling(params, self.default_max_tokens))

    def _stream(self, ids: list[int], options: dict[str, Any]) -> Iterator[Any]:
        generator = torch.Generator()
        if options["seed"] is None:
            generator.seed()  # a fresh random seed
        else:
            generator.manual_seed(options["seed"] % 2**64)  # any integer: OpenAI does not bound it
        prompt_tokens, stop = len(ids), options["stop"]
        text, sent, produced, finish = "", 0, 0, "length"
        while produced < options["max_tokens"]:
            token = self._next_token(ids, options["temperature"], options["top_p"], generator)
            if token == END:
                finish = "stop"
                break
            ids.append(token)
            produced += 1
            text += CHARS[token - 1]
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            ready = len(text) - _held_back(text, stop)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        if len(text) > sent:
            yield text[sent:]
        yield {"finish_reason": finish, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": produced}}

    def _next_token(self, ids: list[int], temperature: float, top_p: float, generator: torch.Generator) -> int:
        # inference_mode per step, not around the loop: a streamed generator may resume on another
        # thread, and grad mode is per thread.
        with torch.inference_mode():
            window = torch.tensor([ids[-(CONTEXT - 1) :] or [END]])
            logits = self.model(window, use_cache=False).logits[0, -1]
            if temperature == 0:
                return int(logits.argmax())
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(0) - ordered > top_p  # keep the smallest set reaching top_p
                probs = probs.scatter(0, order[outside], 0.0)
            return int(torch.multinomial(probs, 1, generator=generator))
