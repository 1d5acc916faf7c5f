"""Webhooks of async APIs: which URL a request may name, and which address a replica may call.

Webhooks are off unless an API's spec turns them on (`queue.webhooks`). The gateway refuses, at
accept, a webhook whose host is not in the API's `allowed_hosts`; the replica, at send time,
resolves the host and refuses to call it when any address it resolves to is not public (loopback,
link-local, private, multicast, reserved, unspecified), unless the spec says `allow_private`. It
then connects to the address it checked, not to whatever a second lookup returns, so a name that
resolves to a public address once and to 127.0.0.1 the next time (DNS rebinding) cannot switch
it; the Host header (and, for https, the TLS server name and certificate check) keep the URL's
host. Redirects are not followed and proxy variables are ignored, for the same reason.

The decisions (`host_allowed`, `address_refusal`, `check_addresses`) are pure functions.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

MAX_WEBHOOK_LENGTH = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookRefused(Exception):
    """A webhook this API may not call; the message says why."""


def parse_webhook(url: str) -> SplitResult:
    """The URL's parts; WebhookRefused unless it is an http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a malformed port raises here
    except ValueError as exc:
        raise WebhookRefused(f"webhook {url[:100]!r} is not a URL: {exc}") from None
    if len(url) > MAX_WEBHOOK_LENGTH or parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook {url[:100]!r} is not an http(s) URL (at most {MAX_WEBHOOK_LENGTH} chars)")
    return parts


def host_allowed(host: str, patterns: Sequence[str]) -> bool:
    """`host` matches one of `patterns`: a name (`hooks.example.com`), its subdomains
    (`*.example.org`: `a.example.org`, `a.b.example.org`, not `example.org`), or `*` (any)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
    return False


def address_refusal(address: IPAddress) -> str | None:
    """Why a webhook must not be sent to `address` (None: it is a public address)."""
    embedded = None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
    if embedded is not None:
        reason = address_refusal(embedded)
        return None if reason is None else f"{reason} (embedded in {address})"
    for check, kind in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(address, check):
            return f"a {kind} address"
    if not address.is_global:  # e.g. 100.64.0.0/10 (shared address space): not routed on the internet
        return "a non-public address"
    return None


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_addresses(host: str, addresses: Sequence[IPAddress], allow_private: bool) -> list[IPAddress]:
    """The addresses to try, in order, once every one passed the check (a name that resolves to a
    public and a private address is refused: which one a connection would use is not ours to bet on)."""
    if not addresses:
        raise WebhookRefused(f"{host} resolves to no address")
    if not allow_private:
        for address in addresses:
            reason = address_refusal(address)
            if reason is not None:
                raise WebhookRefused(
                    f"{host} resolves to {address}, {reason}: this API sends webhooks to public addresses "
                    "only (queue.webhooks.allow_private is for trusted networks)"
                )
    return list(addresses)


def check_at_accept(url: str, allowed_hosts: Sequence[str], allow_private: bool) -> None:
    """The gateway's checks, which need no DNS: the scheme, the host allowlist, an IP literal."""
    parts = parse_webhook(url)
    host = parts.hostname or ""
    if not host_allowed(host, allowed_hosts):
        raise WebhookRefused(f"webhook host {host!r} is not allowed for this API (queue.webhooks.allowed_hosts)")
    literal = ip_literal(host)
    if literal is not None:
        check_addresses(host, [literal], allow_private)


@dataclass(frozen=True)
class Target:
    """Where to send a webhook: the checked addresses, to try in order, and what keeps the URL's
    host for HTTP (the Host header) and TLS (the server name and the certificate's check)."""

    parts: SplitResult
    addresses: list[IPAddress]
    headers: dict[str, str]
    extensions: dict[str, Any]

    def url_for(self, address: IPAddress) -> str:
        """The webhook's URL with its host replaced by `address`."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        userinfo = self.parts.netloc.rpartition("@")[0]
        port = f":{self.parts.port}" if self.parts.port else ""
        return self.parts._replace(netloc=(f"{userinfo}@" if userinfo else "") + literal + port).geturl()


async def resolve(url: str, allowed_hosts: Sequence[str], allow_private: bool) -> Target:
    """Check `url` against the policy and resolve it: WebhookRefused (final) or OSError (the lookup
    failed: worth another try)."""
    parts = parse_webhook(url)
    host = parts.hostname or ""
    if not host_allowed(host, allowed_hosts):
        raise WebhookRefused(f"webhook host {host!r} is not allowed for this API (queue.webhooks.allowed_hosts)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    literal = ip_literal(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
            if address not in addresses:
                addresses.append(address)
    checked = check_addresses(host, addresses, allow_private)
    extensions: dict[str, Any] = {"sni_hostname": host} if parts.scheme == "https" else {}
    return Target(parts, checked, {"host": parts.netloc.rpartition("@")[2]}, extensions)
