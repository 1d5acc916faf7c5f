"""Typed messages between the gateway and a replica, and their framing.

The gateway keeps one persistent stream connection per replica and multiplexes requests over
it: each message is a msgpack-encoded, tagged `msgspec.Struct` behind a 4-byte big-endian
length. `WIRE_VERSION` is checked when a connection opens (the replica's `Hello`).

Only the gateway may use a replica's socket: the controller gives each replica launch a random
`secret` (in `ReplicaLaunch`, never on the socket). A replica's `Hello` carries a fresh nonce; the
connecting side must answer with `Auth`, the HMAC of that nonce under the secret, as its first
frame, within `AUTH_TIMEOUT_S`; the replica closes any other connection unanswered (frames before
`Auth` may be `AUTH_FRAME_BYTES` long at most) and confirms with `Welcome`. `Auth` also tells the
replica the gateway's body limit: a response above it is answered with a 502 instead of a frame
the gateway would refuse.

A replica also reports its start-up result once, as JSON on a pipe the runtime gives it
(`ReplicaReady` or `ReplicaFailed`). A replica template and the local runtime exchange the
`TemplateMessage`s at the end of this module.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any, Literal

import msgspec

WIRE_VERSION = 2
FRAME_HEADROOM_BYTES = 1 << 20  # what a frame carries besides its body: headers, ids, measurements
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # the gateway's default body limit (cirrus.settings)
MAX_FRAME_BYTES = DEFAULT_MAX_BODY_BYTES + FRAME_HEADROOM_BYTES  # frames at most, by default
AUTH_FRAME_BYTES = 4096  # frames at most on a replica connection that has not authenticated yet
AUTH_TIMEOUT_S = 2.0  # a replica closes a connection that has not authenticated by then
_HEADER = struct.Struct(">I")
FRAME_HEADER_BYTES = _HEADER.size  # the length before each frame (not counted by the limit)


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """First frame a replica sends on every new connection."""

    version: int
    replica_id: str
    pid: int
    nonce: bytes = b""  # the connecting side answers `Auth` with its HMAC under the replica's secret


class Auth(msgspec.Struct, tag="auth", frozen=True):
    """The gateway's first frame: proof that it knows the replica's secret, and its body limit."""

    mac: bytes  # auth_mac(secret, the Hello's nonce)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # bodies of responses (and requests) at most


class Welcome(msgspec.Struct, tag="welcome", frozen=True):
    """The replica accepted `Auth`: requests may follow."""


def auth_mac(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, b"cirrus-replica-auth:" + nonce, hashlib.sha256).digest()


def frame_limit(max_body_bytes: int) -> int:
    """The largest frame that carries a body of `max_body_bytes`."""
    return max_body_bytes + FRAME_HEADROOM_BYTES


class InferRequest(msgspec.Struct, tag="req", frozen=True):
    id: int  # unique per connection; the reply carries it back
    request_id: str  # the client-visible X-Request-ID
    body: bytes
    content_type: str
    query_string: bytes = b""
    headers: list[tuple[str, str]] = []
    timeout_s: float = 30.0  # time left for this request when it was sent


class InferResponse(msgspec.Struct, tag="res", frozen=True):
    id: int
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = []
    stream: bool = False  # True: `body` is empty and `StreamChunk` frames follow
    # Measured in the replica for the gateway's per-API metrics (batch_size 0: predict did not run).
    # A stream's head carries pre_s and slot_wait_s only (predict is still running).
    pre_s: float = 0.0  # the pre_predict hook (0: the predictor has none)
    slot_wait_s: float = 0.0  # ready for predict -> its slot (or batch) started
    predict_s: float = 0.0  # the predict (or predict_batch) call that answered this request
    batch_size: int = 0  # requests in that call (1 without batching)
    held: list[str] | None = None  # a multi-model replica: the models it holds now (None: not reported)


class StreamChunk(msgspec.Struct, tag="chunk", frozen=True):
    """One piece of a streamed response (replica -> gateway); `last` ends the stream."""

    id: int
    data: bytes
    last: bool = False
    error: str | None = None  # the generator raised: the stream ends here, cut short
    status: int = 500  # with `error`: the status the failed request counts as (504: it timed out)


class StreamCredit(msgspec.Struct, tag="credit", frozen=True):
    """The gateway delivered `chunks` more chunks to its client: the replica may send as many more."""

    id: int
    chunks: int = 1


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    """The client went away: stop the request (close its generator, free its slot)."""

    id: int


STREAM_WINDOW = 8  # chunks a replica may send ahead of the client (backpressure)

Frame = Hello | Auth | Welcome | InferRequest | InferResponse | StreamChunk | StreamCredit | Cancel


class ReplicaReady(msgspec.Struct, tag="ready", frozen=True):
    address: str  # "tcp:HOST:PORT" or "unix:PATH"
    pid: int
    load_s: float
    openapi: dict[str, Any] | None = None  # request/response JSON schemas of typed predictors


class ReplicaFailed(msgspec.Struct, tag="failed", frozen=True):
    error: str
    stage: str = "load the predictor"  # what failed: "failed to <stage>: <error>" (a web app: "start the app")


StartupReport = ReplicaReady | ReplicaFailed

_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(Frame)
_startup_decoder = msgspec.json.Decoder(StartupReport)


def encode_frame(message: Frame) -> bytes:
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


class FrameTooLarge(ValueError):
    """A frame longer than the connection's limit."""


class FrameBuffer:
    """Accumulates stream bytes and yields whole frames (a frame may span many reads); a frame
    longer than `limit` raises `FrameTooLarge` before its bytes are buffered."""

    __slots__ = ("_buffer", "limit")

    def __init__(self, limit: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        offset = 0
        size = len(buffer)
        while size - offset >= 4:
            (length,) = _HEADER.unpack_from(buffer, offset)
            if length > self.limit:
                raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self.limit}")
            end = offset + 4 + length
            if end > size:
                break
            frames.append(_frame_decoder.decode(buffer[offset + 4 : end]))
            offset = end
        if offset:
            del buffer[:offset]
        return frames


def encode_startup(report: StartupReport) -> bytes:
    return msgspec.json.encode(report) + b"\n"


def decode_startup(line: bytes) -> StartupReport:
    return _startup_decoder.decode(line)


class JobConfig(msgspec.Struct, frozen=True):
    """A batch job's worker: each queued request is a batch for `predict_batch`."""

    job_id: str
    sink: str  # results directory: a local path or an fsspec URL


class WebhookPolicy(msgspec.Struct, frozen=True):
    """The spec's `queue.webhooks`: the hosts a request's webhook may name, and whether the replica
    may call addresses that are not public (cirrus/webhooks.py)."""

    allowed_hosts: list[str]
    allow_private: bool = False


class QueueConfig(msgspec.Struct, frozen=True):
    """Where an async API's replica (or a batch job's worker) pulls its work from, and how."""

    store_url: str  # "sqlite:///path/queue.db" or "redis://host:port/db"
    lease_s: float
    timeout_s: float
    max_concurrency: int
    queue_name: str | None = None  # the queue to pull from (default: the API's name)
    job: JobConfig | None = None  # set for a batch job's workers
    webhooks: WebhookPolicy | None = None  # None: the API sends no webhooks


class BatchConfig(msgspec.Struct, frozen=True):
    """Server-side batching of one replica (the spec's `batching`)."""

    max_batch_size: int
    max_wait_s: float
    mode: Literal["adaptive", "fixed"]
    max_queue: int  # requests waiting for a batch at most (the API's max_concurrency)


class TensorDecl(msgspec.Struct, frozen=True):
    """One input or output of a `protocol: v2` model, as its spec (or its predictor) declares it."""

    name: str
    datatype: str
    shape: list[int]


class ServerLaunch(msgspec.Struct, frozen=True):
    """A `kind: server` replica: the web app it runs and how its readiness is probed."""

    app: str | None = None  # an ASGI app, module:attribute, run by the replica's own uvicorn
    command: list[str] | None = None  # else a command serving HTTP on $CIRRUS_PORT
    root_path: str = ""  # the prefix the gateway serves it under (/<api>), for the app's own links
    readiness_path: str = "/"
    readiness_timeout_s: float = 60.0
    readiness_period_s: float = 5.0
    failure_threshold: int = 3


class TaskLaunch(msgspec.Struct, frozen=True):
    """A `kind: task` replica: the one run it makes, then exits (0: succeeded)."""

    task_id: str
    attempt: int
    config: dict[str, Any] = {}
    command: list[str] | None = None  # else the predictor's run(config)


class ReplicaLaunch(msgspec.Struct, frozen=True):
    """Everything a replica process needs to start, passed by the runtime as JSON."""

    api: str
    replica_id: str
    revision: int
    project_dir: str
    predictor_path: str
    class_name: str
    config: dict[str, Any]
    inference_slots: int
    secret: bytes  # random per launch: a connection must prove it knows it (`Auth`)
    listen: str = "tcp:127.0.0.1:0"
    version: int = WIRE_VERSION
    batching: BatchConfig | None = None  # None: every request gets its own predict call
    queue: QueueConfig | None = None  # an async API's replica: pull work from this queue store
    models: dict[str, str] = {}  # the API's models, fetched: name -> local path
    model_cache_size: int | None = None  # multi_model: models held in memory at most; None: not multi-model
    model_versions: dict[str, str] = {}  # the version label of each model that has one
    debug_errors: bool = False  # 500 bodies show the predictor's exception message (else only the request id)
    snapshot: str | None = None  # the digest of the code snapshot at project_dir (a cluster runtime ships it)
    model_urls: dict[str, str] = {}  # the models that come from a URL: a node other than the daemon's fetches its own
    protocol: str | None = None  # the standard protocol the API also speaks (the spec's `protocol`: v2, openai)
    tensor_inputs: list[TensorDecl] = []  # protocol v2: the inputs the spec declares (requests are checked)
    tensor_outputs: list[TensorDecl] = []  # protocol v2: the outputs it declares (their datatypes)
    python: str | None = None  # the interpreter of the API's own environment (`python:`); None: the runtime's
    server: ServerLaunch | None = None  # kind server: the app it serves instead of a predictor
    task: TaskLaunch | None = None  # kind task: the run it makes


def encode_launch(launch: ReplicaLaunch) -> str:
    return msgspec.json.encode(launch).decode()


def decode_launch(text: str) -> ReplicaLaunch:
    return msgspec.json.decode(text, type=ReplicaLaunch)


# --- a replica template and its runtime ---------------------------------------------------------
#
# A template process (`python -m cirrus.replica.template`) has imported one revision's predictor
# module and forks replicas from it. It talks to the local runtime over a SOCK_SEQPACKET unix
# socketpair: one msgpack message per packet, file descriptors passed alongside with SCM_RIGHTS.


class TemplateReady(msgspec.Struct, tag="template_ready", frozen=True):
    """The template imported the predictor module and waits for fork requests."""

    pid: int
    import_s: float
    threads: int  # OS threads in the template (native pools such as OpenBLAS count)


class TemplateFailed(msgspec.Struct, tag="template_failed", frozen=True):
    """The predictor module failed to import; the template exits."""

    error: str


class ForkRequest(msgspec.Struct, tag="fork", frozen=True):
    """Fork one replica. Sent with two descriptors: the status pipe's write end, then the log file."""

    launch: ReplicaLaunch
    env: dict[str, str]  # the replica's whole environment (replaces the template's)


class Forked(msgspec.Struct, tag="forked", frozen=True):
    replica_id: str
    pid: int


class ForkFailed(msgspec.Struct, tag="fork_failed", frozen=True):
    replica_id: str
    error: str


class ChildExited(msgspec.Struct, tag="child_exited", frozen=True):
    """A forked replica ended: `code` as in `subprocess` (negative: killed by that signal)."""

    pid: int
    code: int


class Retire(msgspec.Struct, tag="retire", frozen=True):
    """Fork no more; exit once every replica forked so far has exited."""


TemplateMessage = TemplateReady | TemplateFailed | ForkRequest | Forked | ForkFailed | ChildExited | Retire
TEMPLATE_MESSAGE_MAX_BYTES = 1 << 20  # one packet on the template socket, fds aside

_template_decoder = msgspec.msgpack.Decoder(TemplateMessage)


def encode_template_message(message: TemplateMessage) -> bytes:
    data = _encoder.encode(message)
    if len(data) > TEMPLATE_MESSAGE_MAX_BYTES:
        raise ValueError(f"a {type(message).__name__} of {len(data)} bytes exceeds {TEMPLATE_MESSAGE_MAX_BYTES}")
    return data


def decode_template_message(data: bytes) -> TemplateMessage:
    return _template_decoder.decode(data)
