"""Test doubles shipped with Cirrus, so the project's tests and users' tests share them.

`FakeRuntime` runs no processes: a test starts, readies, crashes and fails replicas by hand.
`FakeGateway` records what the controller asks of the gateway and connects replicas instantly.
"""

from __future__ import annotations

from cirrus.testing.fake_runtime import FakeGateway, FakeRuntime

__all__ = ["FakeGateway", "FakeRuntime"]
