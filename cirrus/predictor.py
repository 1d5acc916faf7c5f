"""The user's side: `Response`, `HTTPError`, and how a predictor class is loaded and called.

A predictor asks for what it uses: arguments of `predict`, `pre_predict` and `post_predict` are
injected by name (`payload`, `query_params`, `headers`, `request_id`, and `response` for
`post_predict`). A `payload` annotated with a pydantic model is validated (422 on failure), and
a pydantic return annotation shapes the output; both appear in the API's OpenAPI document.

A multi-model API (the spec's `multi_model`) serves its `models:` by name: the class defines
`load_model(self, path)` (and optionally `unload_model(self, model)`), the replica keeps the most
recently used models in memory (`cirrus.models.lru.ModelLRU`), and `predict` asks for `model`: the
loaded model the request named (`POST /<api>/<model>` or the `X-Cirrus-Model` header). Injection
rather than a `self.get_model(name)` method keeps the class free of Cirrus attributes and lets the
replica answer 400/404 for a missing or unknown name before `predict` runs.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

INJECTABLE = ("payload", "query_params", "headers", "request_id")
HOOK_NAMES = ("pre_predict", "predict", "post_predict")


class Response:
    """A full response: status, headers and body (bytes, str, or a JSON-able object)."""

    __slots__ = ("body", "headers", "media_type", "status")

    def __init__(
        self,
        body: Any = b"",
        status: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        if not 100 <= int(status) <= 599:
            raise ValueError(f"status {status} is not an HTTP status code")
        self.body = body
        self.status = int(status)
        self.headers = dict(headers or {})
        self.media_type = media_type


class HTTPError(Exception):
    """Raise from a predictor to answer with this status and message (e.g. 400 for bad input)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PredictorFailed(HTTPError):
    """The predictor failed where that makes a 500 for requests it was not called for alone (a batch
    that raised, a batch answered with the wrong number of results). `message` says how it failed: a
    replica shows it only with `debug_errors` (it may carry paths, hosts or secrets)."""

    def __init__(self, message: str) -> None:
        super().__init__(500, message)

    @classmethod
    def raised(cls, exc: BaseException) -> PredictorFailed:
        return cls(f"the predictor raised {type(exc).__name__}: {exc}")


class PredictorLoadError(Exception):
    """The predictor file or class cannot be used; the message says why."""


@dataclass
class Call:
    """The per-request values a hook may ask for."""

    payload: Any
    query_params: dict[str, str]
    headers: dict[str, str]
    request_id: str
    model: Any = None  # a multi-model API: the loaded model the request named (`predict(model)`)
    get_model: Any = None  # a multi-model API: `get_model(name, version=None)` for any of its models
    # What the replica measured around predict, reported to the gateway with the reply.
    pre_s: float = 0.0  # the pre_predict hook (0: there is none)
    slot_wait_s: float = 0.0  # ready for predict -> predict (or its batch) started on a slot
    predict_s: float = 0.0  # the predict (or predict_batch) call
    batch_size: int = 0  # requests answered by that call (0: predict did not run)


@dataclass
class Method:
    """One user method and the names it wants injected."""

    fn: Any
    wants: tuple[str, ...]
    is_async: bool
    payload_model: Any = None  # pydantic model class validating `payload`, or None
    return_model: Any = None  # pydantic model class shaping the return value, or None

    def kwargs(self, call: Call, response: Any = None) -> dict[str, Any]:
        values = {
            "payload": call.payload,
            "query_params": call.query_params,
            "headers": call.headers,
            "request_id": call.request_id,
            "response": response,
            "model": call.model,
            "get_model": call.get_model,
        }
        return {name: values[name] for name in self.wants}


@dataclass
class LoadedPredictor:
    instance: Any
    predict: Method
    pre_predict: Method | None = None
    post_predict: Method | None = None
    predict_batch: Method | None = None  # `predict_batch(payloads)`, used when the API has `batching`
    schemas: dict[str, Any] = field(default_factory=dict)
    on_job_complete: Method | None = None  # a batch job's worker: `on_job_complete(job)`, once per job
    load_model: Any = None  # a multi-model API: the bound `load_model(path)`, called on a cache miss
    unload_model: Any = None  # optional bound `unload_model(model)`, called when a model is evicted
    # `protocol: openai`: the endpoints the class supports (cirrus/replica/openai.py calls them)
    embed: Method | None = None  # `embed(texts)` -> one vector per text (/v1/embeddings)
    chat: Method | None = None  # `chat(messages, params)` -> a reply, or a generator of pieces
    complete: Method | None = None  # `complete(prompt, params)` -> the same


OPENAI_METHODS = {"embed": ("texts",), "chat": ("messages", "params"), "complete": ("prompt", "params")}


# predictor file (resolved) -> (its module, the file's (mtime_ns, size) when it was executed)
_imported: dict[Path, tuple[Any, tuple[int, int]]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def import_predictor_file(project_dir: str, path: str) -> Any:
    """Import the user's predictor file (module-level code runs here, the class is not built).

    A replica template calls this before it forks; `load_predictor` in the forked replica then
    finds the module already imported and does not run it again."""
    project = Path(project_dir)
    file = project / path
    if not file.is_file():
        raise PredictorLoadError(f"predictor file {file} does not exist")
    return _import_file(file, project)


def _import_file(path: Path, project_dir: Path) -> Any:
    """The module of `path`, executed once per process: a later call for the same, unchanged file
    returns the module already imported (a forked replica reuses its template's)."""
    if str(project_dir) not in sys.path:
        sys.path.insert(0, str(project_dir))
    module_name = f"cirrus_user_{path.stem}"
    key = path.resolve()
    stamp = _stamp(key)
    cached = _imported.get(key)
    if cached is not None and cached[1] == stamp and sys.modules.get(module_name) is cached[0]:
        return cached[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PredictorLoadError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        _imported.pop(key, None)
        raise
    _imported[key] = (module, stamp)
    return module


def _pydantic_model(annotation: Any) -> Any:
    """The annotation if it is a pydantic model class (only looked for when pydantic is loaded)."""
    if "pydantic" not in sys.modules or not isinstance(annotation, type):
        return None
    from pydantic import BaseModel

    return annotation if issubclass(annotation, BaseModel) else None


def _method(instance: Any, name: str, allowed: tuple[str, ...]) -> Method | None:
    fn = getattr(instance, name, None)
    if fn is None:
        return None
    if not callable(fn):
        raise PredictorLoadError(f"{type(instance).__name__}.{name} is not a method")
    signature = inspect.signature(fn)
    wants: list[str] = []
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            wants += [n for n in allowed if n not in wants]
            break
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise PredictorLoadError(
                f"{type(instance).__name__}.{name}() takes {param.name!r} positionally only; Cirrus passes "
                "arguments by name, so remove the '/'"
            )
        if param.name in allowed:
            wants.append(param.name)
        elif param.default is inspect.Parameter.empty:
            raise PredictorLoadError(
                f"{type(instance).__name__}.{name}() asks for {param.name!r}, which Cirrus cannot inject; "
                f"use any of: {', '.join(allowed)}"
            )
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    is_async = inspect.iscoroutinefunction(fn)
    if name in ("pre_predict", "post_predict") and not is_async:
        raise PredictorLoadError(
            f"{type(instance).__name__}.{name} must be `async def`: hooks do I/O without holding a slot"
        )
    return Method(
        fn=fn,
        wants=tuple(wants),
        is_async=is_async,
        payload_model=_pydantic_model(hints.get("payload")),
        return_model=_pydantic_model(hints.get("return")),
    )


def _no_predict(payload: Any = None) -> Any:
    raise HTTPError(405, "this is a batch API: it runs jobs (cirrus jobs submit), not requests")


def _openai_only(payload: Any = None) -> Any:
    raise HTTPError(405, "this API's predictor has no predict method: it serves the OpenAI-compatible /v1 endpoints")


def _openai_methods(instance: Any, multi_model: bool) -> dict[str, Method | None]:
    """`protocol: openai`: embed, chat and complete, those the class defines (each asks for its own
    arguments, and `headers`, `request_id`, `model` as predict does)."""
    extra = (*INJECTABLE[1:], "model", "get_model") if multi_model else INJECTABLE[1:]
    methods = {name: _method(instance, name, (*own, *extra)) for name, own in OPENAI_METHODS.items()}
    for name, method in methods.items():
        missing = [arg for arg in OPENAI_METHODS[name] if method is not None and arg not in method.wants]
        if missing:
            raise PredictorLoadError(f"{type(instance).__name__}.{name}() must take {' and '.join(missing)}")
    return methods


def _init_kwargs(cls: type, config: dict[str, Any], models: dict[str, str]) -> dict[str, Any]:
    """`__init__` asks for what it uses: `config`, `models` ({name: local path}) and `model_path`
    (the path of the API's only model, or None when it has none)."""
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "config" in params:
        kwargs["config"] = config
    if "models" in params:
        kwargs["models"] = dict(models)
    if "model_path" in params:
        if len(models) > 1:
            raise PredictorLoadError(
                f"{cls.__name__}.__init__ asks for model_path, but the API has {len(models)} models "
                f"({', '.join(sorted(models))}): ask for `models` (a dict of name -> path) instead"
            )
        kwargs["model_path"] = next(iter(models.values()), None)
    return kwargs


def load_predictor(
    project_dir: str,
    path: str,
    class_name: str,
    config: dict[str, Any],
    batching: bool = False,
    batch_job: bool = False,
    models: dict[str, str] | None = None,
    multi_model: bool = False,
    protocol: str | None = None,
) -> LoadedPredictor:
    """Import the user's file, construct the class once, and inspect its methods. With `batching`
    the class must also define `predict_batch(self, payloads: list) -> list`; a batch job's worker
    (`batch_job`) needs only `predict_batch`, and may define `on_job_complete(self, job)`. A
    `multi_model` API's class must define `load_model(self, path)`, and its `predict` may ask
    for `model`. A `protocol: openai` API's class defines any of `embed`, `chat`, `complete` (and
    then needs no predict); with `batching`, `embed` batches without a predict_batch."""
    project = Path(project_dir)
    file = project / path
    if not file.is_file():
        raise PredictorLoadError(f"predictor file {file} does not exist")
    module = _import_file(file, project)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise PredictorLoadError(f"{file} defines no class named {class_name!r}")
    if batch_job and getattr(cls, "predict_batch", None) is None:
        raise PredictorLoadError(
            f"a batch API calls predict_batch, but {class_name} has none: define "
            "`def predict_batch(self, payloads: list) -> list` (one result per payload, in order)"
        )
    openai = protocol == "openai"
    if openai and not any(callable(getattr(cls, n, None)) for n in ("predict", *OPENAI_METHODS)):
        raise PredictorLoadError(
            f"the API has `protocol: openai` but {class_name} has none of embed, chat, complete or predict: "
            "define `embed(self, texts)`, `chat(self, messages, params)` or `complete(self, prompt, params)`"
        )
    batches_embed = openai and callable(getattr(cls, "embed", None))
    if batching and not batches_embed and getattr(cls, "predict_batch", None) is None:  # before construction
        raise PredictorLoadError(
            f"the API has `batching` but {class_name} has no predict_batch method: define "
            "`def predict_batch(self, payloads: list) -> list` (one result per payload, in order), "
            "or remove `batching` from the spec"
        )
    if multi_model and not callable(getattr(cls, "load_model", None)):
        raise PredictorLoadError(
            f"the API has `multi_model` but {class_name} has no load_model method: define "
            "`def load_model(self, path)` returning the model at that local path (predict then asks "
            "for `model`), or remove `multi_model` from the spec"
        )
    instance = cls(**_init_kwargs(cls, config, models or {}))
    predict = _method(instance, "predict", (*INJECTABLE, "model", "get_model") if multi_model else INJECTABLE)
    if predict is None and batch_job:
        predict = Method(fn=_no_predict, wants=("payload",), is_async=False)
    endpoints = _openai_methods(instance, multi_model) if openai else {}
    if predict is None and any(endpoints.values()):
        predict = Method(fn=_openai_only, wants=("payload",), is_async=False)
    if predict is None:
        raise PredictorLoadError(f"{class_name} has no predict method")
    loaded = LoadedPredictor(
        instance=instance,
        predict=predict,
        pre_predict=_method(instance, "pre_predict", INJECTABLE),
        post_predict=_method(instance, "post_predict", (*INJECTABLE, "response")),
        predict_batch=_method(instance, "predict_batch", ("payloads",)) if batching or batch_job else None,
        on_job_complete=_method(instance, "on_job_complete", ("job",)) if batch_job else None,
        load_model=instance.load_model if multi_model else None,
        unload_model=getattr(instance, "unload_model", None) if multi_model else None,
        embed=endpoints.get("embed"),
        chat=endpoints.get("chat"),
        complete=endpoints.get("complete"),
    )
    if loaded.predict_batch is not None and "payloads" not in loaded.predict_batch.wants:
        raise PredictorLoadError(f"{class_name}.predict_batch() must take the list of payloads as `payloads`")
    return loaded


def openapi_document(api: str, predictor: LoadedPredictor) -> dict[str, Any]:
    """An OpenAPI 3.1 document for `POST /<api>` from the predictor's pydantic annotations."""
    method = predictor.predict
    components: dict[str, Any] = {}
    request_schema: dict[str, Any] = {}
    response_schema: dict[str, Any] = {}
    models: list[Any] = [
        (m, mode) for m, mode in ((method.payload_model, "validation"), (method.return_model, "serialization")) if m
    ]
    if models:
        from pydantic.json_schema import models_json_schema

        refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
        components = defs.get("$defs", {})
        if method.payload_model is not None:
            request_schema = refs[(method.payload_model, "validation")]
        if method.return_model is not None:
            response_schema = refs[(method.return_model, "serialization")]
    error = {
        "type": "object",
        "properties": {"error": {"type": "string"}, "request_id": {"type": "string"}},
        "required": ["error"],
    }
    responses: dict[str, Any] = {
        "200": {
            "description": "the prediction",
            "content": {"application/json": {"schema": response_schema}},
        },
        "400": {"description": "malformed payload", "content": {"application/json": {"schema": error}}},
        "500": {"description": "the predictor raised", "content": {"application/json": {"schema": error}}},
        "503": {"description": "overloaded; retry after Retry-After seconds"},
        "504": {"description": "timed out"},
    }
    if method.payload_model is not None:
        responses["422"] = {"description": "the payload failed validation"}
    return {
        "openapi": "3.1.0",
        "info": {"title": api, "version": "1", "description": (predictor.instance.__doc__ or "").strip()},
        "paths": {
            f"/{api}": {
                "post": {
                    "operationId": f"predict_{api.replace('-', '_')}",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": request_schema}},
                    },
                    "responses": responses,
                }
            }
        },
        "components": {"schemas": components},
    }


class PayloadError(Exception):
    """A request body that cannot be decoded for its Content-Type."""


JSON_TOO_DEEP = "JSON nested too deeply"


def decode_payload(body: bytes, content_type: str) -> Any:
    """JSON -> Python object, text/* -> str, anything else -> bytes."""
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        if not body:
            return None
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise PayloadError(f"malformed JSON body: {exc}") from None
        except RecursionError:  # a few KB of brackets
            raise PayloadError(JSON_TOO_DEEP) from None
    if media.startswith("text/"):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"text body is not valid UTF-8: {exc}") from None
    return body


def _enc_hook(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    raise TypeError(f"cannot serialise a {type(value).__name__} as JSON; return a JSON-able value, str or bytes")


_json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def encode_json(value: Any) -> bytes:
    return _json_encoder.encode(value)


def encode_result(value: Any) -> tuple[int, str, bytes, list[tuple[str, str]]]:
    """A predictor's return value -> (status, content type, body, extra headers)."""
    if isinstance(value, Response):
        status, body_value = value.status, value.body
        headers = [(k, str(v)) for k, v in value.headers.items() if k.lower() != "content-type"]
        explicit = value.media_type or next(
            (str(v) for k, v in value.headers.items() if k.lower() == "content-type"), None
        )
        _, default_type, body, _ = encode_result(body_value)
        return status, explicit or default_type, body, headers
    if isinstance(value, bytes | bytearray | memoryview):
        return 200, "application/octet-stream", bytes(value), []
    if isinstance(value, str):
        return 200, "text/plain; charset=utf-8", value.encode(), []
    return 200, "application/json", encode_json(value), []
