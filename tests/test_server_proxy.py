"""The proxy's header rules for `kind: server` APIs (cirrus/gateway/proxy.py), as pure functions."""

from __future__ import annotations

from cirrus.gateway.proxy import SECRET_HEADER, _upstream_path, response_headers, upstream_headers
from cirrus.replica.app_server import SECRET_HEADER as REPLICA_SECRET_HEADER


def _scope(headers: list[tuple[bytes, bytes]], **extra: object) -> dict:
    return {"headers": headers, "client": ("10.0.0.7", 5555), "scheme": "https", "path": "/", **extra}


def test_the_gateway_sends_the_header_the_replica_checks() -> None:
    assert REPLICA_SECRET_HEADER.encode() == SECRET_HEADER


def test_request_headers_drop_hop_by_hop_and_cirrus_ones() -> None:
    scope = _scope(
        [
            (b"host", b"api.example.com"),
            (b"connection", b"keep-alive, x-secret-hop"),
            (b"x-secret-hop", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"transfer-encoding", b"chunked"),
            (b"te", b"trailers"),
            (b"upgrade", b"h2c"),
            (b"proxy-authorization", b"basic x"),
            (b"x-cirrus-replica-secret", b"forged"),
            (b"x-cirrus-model", b"m"),
            (b"x-forwarded-prefix", b"/elsewhere"),
            (b"x-forwarded-for", b"1.2.3.4"),
            (b"x-request-id", b"client-id"),
            (b"accept", b"application/json"),
            (b"cookie", b"a=1"),
            (b"traceparent", b"00-client"),
            (b"content-length", b"12"),
            (b"expect", b"100-continue"),
        ]
    )
    headers = upstream_headers("shop", scope, "rid-1", b"ab" * 32, "00-gateway")
    as_dict = dict(headers)
    assert len(as_dict) == len(headers)  # each once
    assert as_dict == {
        b"host": b"api.example.com",
        b"accept": b"application/json",
        b"cookie": b"a=1",
        b"x-forwarded-for": b"1.2.3.4, 10.0.0.7",
        b"x-forwarded-proto": b"https",
        b"x-forwarded-host": b"api.example.com",
        b"x-forwarded-prefix": b"/shop",
        b"x-request-id": b"rid-1",
        b"traceparent": b"00-gateway",
        SECRET_HEADER: b"ab" * 32,
    }


def test_response_headers_drop_hop_by_hop_and_add_the_request_id() -> None:
    raw = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Private"),
        (b"X-Private", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert response_headers(raw, "rid") == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-request-id", b"rid"),
    ]
    assert response_headers([(b"X-Request-Id", b"the-apps")], "rid") == [(b"x-request-id", b"the-apps")]


def test_the_path_after_the_prefix_stays_as_the_client_encoded_it() -> None:
    scope = _scope([], raw_path=b"/shop/a%2Fb/c%20d", path="/shop/a/b/c d", query_string=b"x=1&y=%26")
    assert _upstream_path("shop", "a/b/c d", scope) == b"/a%2Fb/c%20d?x=1&y=%26"
    assert _upstream_path("shop", "", _scope([], raw_path=b"/shop", path="/shop")) == b"/"
    assert _upstream_path("shop", "", _scope([], raw_path=b"/shop/", path="/shop/")) == b"/"
