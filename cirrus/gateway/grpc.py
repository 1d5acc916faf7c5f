"""The gateway's gRPC port: the Open Inference Protocol v2 `GRPCInferenceService` (grpc.aio).

Each RPC becomes the equivalent v2 REST request (cirrus/protocols/v2_grpc.py) and runs through the
gateway's own ASGI app in this process, so gRPC and REST share one path: routing, API keys (the
`authorization` or `x-api-key` metadata), slots, batching (gRPC and REST requests batch together),
metrics and errors (a REST status becomes the matching gRPC status, its `error` as the details).

The server runs on the gateway's event loop (grpc.aio works on uvloop). grpcio is optional
(`pip install 'cirrus-serve[grpc]'`): this module is imported only when a gRPC port is configured.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import grpc
except ImportError as exc:  # pragma: no cover - the grpc extra is not installed
    raise ImportError(f"the gRPC port needs grpcio: pip install 'cirrus-serve[grpc]' ({exc})") from None

from cirrus.protocols import grpc_service_pb2 as pb
from cirrus.protocols import grpc_service_pb2_grpc as pb_grpc
from cirrus.protocols import v2_grpc
from cirrus.protocols.v2_grpc import RestReply, RestRequest, RpcError

log = logging.getLogger("cirrus.gateway.grpc")

App = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]
MESSAGE_OVERHEAD_BYTES = 64 * 1024  # a ModelInferRequest's framing beyond its tensors' bytes
KEEPALIVE_MS = 60_000  # ping an idle connection this often ...
KEEPALIVE_TIMEOUT_MS = 20_000  # ... and close it when the ping goes unanswered this long
MIN_CLIENT_PING_MS = 10_000  # a client may ping no more often than this
# gRPC's own metadata and what the converted request sets itself: not forwarded as HTTP headers
_NOT_FORWARDED = frozenset(
    {"content-type", "content-length", "inference-header-content-length", "host", "te", "connection"}
)


class GrpcError(Exception):
    """The gRPC port cannot serve (grpcio missing, the port taken, a bad certificate)."""


@dataclass(frozen=True)
class GrpcTls:
    cert_file: str
    key_file: str


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService`, answered by running each RPC as v2 REST through `app`."""

    def __init__(self, app: App, scheme: str = "http") -> None:
        self.app = app
        self.scheme = scheme

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        reply = await self._run(v2_grpc.get("/v2/health/live"), context)
        return pb.ServerLiveResponse(live=await _checked(context, v2_grpc.is_ready, reply))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        reply = await self._run(v2_grpc.get("/v2/health/ready"), context)
        return pb.ServerReadyResponse(ready=await _checked(context, v2_grpc.is_ready, reply))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        path = await _checked(context, v2_grpc.model_path, request.name, request.version)
        reply = await self._run(v2_grpc.get(path + "/ready"), context)
        return pb.ModelReadyResponse(ready=await _checked(context, v2_grpc.is_ready, reply))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        reply = await self._run(v2_grpc.get("/v2"), context)
        return await _checked(context, v2_grpc.server_metadata, reply)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        path = await _checked(context, v2_grpc.model_path, request.name, request.version)
        reply = await self._run(v2_grpc.get(path), context)
        return await _checked(context, v2_grpc.model_metadata, reply)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        # the hot path: the conversions are called inline (no `_checked` coroutine per step)
        try:
            rest = v2_grpc.infer_request(request)
        except RpcError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        reply = await self._run(rest, context)
        try:
            return v2_grpc.infer_response(reply)
        except RpcError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
            raise  # (abort raises)

    async def _run(self, request: RestRequest, context: Any) -> RestReply:
        headers = request.headers + forwarded_metadata(context.invocation_metadata() or ())
        return await call_app(self.app, request, headers, client_address(context.peer()), self.scheme)


async def _checked(context: Any, convert: Callable[..., Any], *args: Any) -> Any:
    """`convert(*args)`; an RpcError ends the RPC with its status and message."""
    try:
        return convert(*args)
    except RpcError as exc:
        await context.abort(grpc.StatusCode[exc.code], exc.message)


def forwarded_metadata(metadata: Any) -> list[tuple[bytes, bytes]]:
    """The RPC's metadata as HTTP headers (authorization, x-api-key, x-request-id ...): text entries
    only, less gRPC's own and what the converted request sets itself."""
    headers = []
    for key, value in metadata:
        if key.startswith((":", "grpc-")) or key.endswith("-bin") or key in _NOT_FORWARDED:
            continue
        if isinstance(value, str):
            headers.append((key.lower().encode("latin-1"), value.encode("latin-1", "replace")))
    return headers


@functools.lru_cache(maxsize=4096)
def client_address(peer: str | None) -> tuple[str, int] | None:
    """`ipv4:127.0.0.1:5000` / `ipv6:[::1]:5000` as an ASGI scope's `client` (a connection's RPCs share
    their peer: parsed once)."""
    if not peer or not peer.startswith(("ipv4:", "ipv6:")):
        return None
    host, _, port = peer.partition(":")[2].rpartition(":")
    try:
        return host.strip("[]").replace("%5B", "").replace("%5D", ""), int(port)
    except ValueError:
        return None


_START, _BODY = "http.response.start", "http.response.body"
_DISCONNECT = {"type": "http.disconnect"}


async def call_app(
    app: App,
    request: RestRequest,
    headers: list[tuple[bytes, bytes]],
    client: tuple[str, int] | None,
    scheme: str = "http",
) -> RestReply:
    """Run one HTTP request through an ASGI app in this process; the answer it sent."""
    body = request.body
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "2",
        "method": request.method,
        "scheme": scheme,
        "path": request.path,
        "raw_path": request.raw_path,
        "root_path": "",
        "query_string": b"",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "client": client,
        "server": None,
    }
    first: dict[str, Any] | None = {"type": "http.request", "body": body, "more_body": False}
    ended: asyncio.Event | None = None  # made only when the app waits past the body (a stream does)
    over = False
    status = 500
    reply_headers: list[tuple[bytes, bytes]] = []
    parts: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal first, ended
        if first is not None:
            message, first = first, None
            return message
        if ended is None:
            ended = asyncio.Event()
            if over:
                ended.set()
        await ended.wait()  # "disconnect" only once the RPC is over (a stream watches for it)
        return dict(_DISCONNECT)

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, reply_headers
        kind = message["type"]
        if kind == _START:
            status, reply_headers = message["status"], list(message.get("headers", ()))
        elif kind == _BODY:
            parts.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        over = True
        if ended is not None:
            ended.set()
    return RestReply(status, reply_headers, b"".join(parts))


class GrpcServer:
    """A running gRPC port: `address` is HOST:PORT as bound."""

    def __init__(self, server: Any, host: str, port: int) -> None:
        self._server = server
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs; those in flight get `grace_s` to finish."""
        await self._server.stop(grace_s)


async def start_grpc(
    app: App,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    max_concurrent_rpcs: int,
    tls: GrpcTls | None = None,
) -> GrpcServer:
    """Serve `inference.GRPCInferenceService` on HOST:PORT (0: any free port) through `app` (the gateway),
    on the running event loop. GrpcError: the port cannot be bound or the certificate not read."""
    options = [
        ("grpc.so_reuseport", 0),  # a port another process holds is an error, not shared
        ("grpc.max_receive_message_length", max_message_bytes + MESSAGE_OVERHEAD_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_MS),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(app, "https" if tls else "http"), server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(target)
        else:
            pair = (Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())
            bound = server.add_secure_port(target, grpc.ssl_server_credentials([pair]))
    except (OSError, RuntimeError) as exc:
        raise GrpcError(f"cannot serve gRPC on {target}: {exc}; pick another port (--grpc-port)") from None
    if not bound:
        raise GrpcError(f"cannot serve gRPC on {target}: the address is taken or invalid; pick another port")
    await server.start()
    log.info("gRPC (Open Inference Protocol v2) on %s", target.rsplit(":", 1)[0] + f":{bound}")
    return GrpcServer(server, host, bound)
