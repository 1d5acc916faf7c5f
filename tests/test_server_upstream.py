"""The proxy's HTTP/1.1 client (cirrus/gateway/upstream.py) against real servers on real sockets:
uvicorn serving an ASGI app, and raw asyncio servers answering what uvicorn never would (bodies that
run until the connection closes, connections closed while idle)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn

from cirrus.gateway.upstream import ConnectFailed, HttpUpstream, UpstreamError


async def echo_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict]], send: Any) -> None:
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    framing = next((v for k, v in scope["headers"] if k in (b"content-length", b"transfer-encoding")), b"none")
    out = b"%s %s %d %s" % (scope["method"].encode(), scope["raw_path"], len(body), framing)
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(out)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})


async def with_uvicorn(test: Callable[[HttpUpstream], Awaitable[None]]) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(echo_app, lifespan="off", log_level="warning", http="httptools", loop="none")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        await test(HttpUpstream(f"http://127.0.0.1:{sock.getsockname()[1]}", b"s" * 32, 4))
    finally:
        server.should_exit = True
        await task


async def read(
    upstream: HttpUpstream, method: str, target: bytes, body: Any = b"", declared: bytes | None = None
) -> tuple[int, bytes]:
    response = await upstream.request(method, target, [(b"host", b"app")], body, declared)
    try:
        return response.status, b"".join([chunk async for chunk in response.body()])
    finally:
        response.release()


def test_requests_reuse_one_kept_alive_connection_and_frame_bodies() -> None:
    async def test(upstream: HttpUpstream) -> None:
        assert await read(upstream, "GET", b"/a?x=1") == (200, b"GET /a 0 none")
        [conn] = upstream.idle
        assert await read(upstream, "POST", b"/b", b"hello") == (200, b"POST /b 5 5")

        async def parts() -> AsyncIterator[bytes]:
            for piece in (b"ab", b"", b"cde"):
                yield piece

        assert await read(upstream, "PUT", b"/c", parts()) == (200, b"PUT /c 5 chunked")
        assert await read(upstream, "PUT", b"/d", parts(), declared=b"5") == (200, b"PUT /d 5 5")
        assert upstream.idle == [conn]  # the same connection all along
        head = await upstream.request("HEAD", b"/e", [], b"", None)  # Content-Length, no body: not awaited
        assert head.status == 200 and [c async for c in head.body()] == []
        head.release()

    asyncio.run(with_uvicorn(test))


async def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_a_body_that_runs_until_close_and_an_idle_connection_the_server_closed() -> None:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if connections == 1:  # keep-alive, then closed by the server while idle
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.1)
        else:  # HTTP/1.0 style: the body ends when the connection does
            writer.write(b"HTTP/1.0 201 Created\r\n\r\nall of ")
            await writer.drain()
            writer.write(b"it")
        writer.close()

    async def test() -> None:
        server, address = await raw_server(handle)
        upstream = HttpUpstream(address, b"s" * 32, 4)
        assert await read(upstream, "GET", b"/") == (200, b"ok")
        await asyncio.sleep(0.3)  # the server closed it meanwhile
        assert upstream.idle == []
        assert await read(upstream, "GET", b"/") == (201, b"all of it")
        assert upstream.idle == []  # not kept: it is closed
        server.close()

    asyncio.run(test())


def test_no_server_and_a_reset_are_errors() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        if request.startswith(b"GET /many"):
            writer.write(b"HTTP/1.1 200 OK\r\n" + b"x-h: 1\r\n" * 300 + b"\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\ncut")
        await writer.drain()
        writer.close()

    async def test() -> None:
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await HttpUpstream(f"http://127.0.0.1:{port}", b"s" * 32, 1).request("GET", b"/", [], b"", None)
        server, address = await raw_server(handle)
        response = await HttpUpstream(address, b"s" * 32, 1).request("GET", b"/", [], b"", None)
        with pytest.raises(UpstreamError, match="closed the connection"):
            [chunk async for chunk in response.body()]
        response.release()
        with pytest.raises(UpstreamError, match="over 256 headers"):
            await HttpUpstream(address, b"s" * 32, 1).request("GET", b"/many", [], b"", None)
        server.close()

    asyncio.run(test())
