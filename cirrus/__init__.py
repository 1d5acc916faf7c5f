"""Cirrus: serverless inference for machine learning.

`import cirrus` stays light: the clients and the predictor helpers load on first use, and `dir(cirrus)`
lists only the public names (`__all__`).
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from cirrus.async_client import AsyncClient
    from cirrus.client import Client
    from cirrus.client_common import (
        AsyncRequest,
        CirrusError,
        CirrusTimeoutError,
        DaemonNotRunningError,
        InvalidSettingsError,
        InvalidSpecError,
        NotFoundError,
        RequestFailedError,
        RequestPendingError,
        StreamError,
    )
    from cirrus.predictor import HTTPError, Response

__version__ = "0.1.0"

_LAZY = {
    "AsyncClient": "cirrus.async_client",
    "Client": "cirrus.client",
    "HTTPError": "cirrus.predictor",
    "Response": "cirrus.predictor",
    **dict.fromkeys(
        (
            "AsyncRequest",
            "CirrusError",
            "CirrusTimeoutError",
            "DaemonNotRunningError",
            "InvalidSettingsError",
            "InvalidSpecError",
            "NotFoundError",
            "RequestFailedError",
            "RequestPendingError",
            "StreamError",
        ),
        "cirrus.client_common",
    ),
}

__all__ = [
    "AsyncClient",
    "AsyncRequest",
    "CirrusError",
    "CirrusTimeoutError",
    "Client",
    "DaemonNotRunningError",
    "HTTPError",
    "InvalidSettingsError",
    "InvalidSpecError",
    "NotFoundError",
    "RequestFailedError",
    "RequestPendingError",
    "Response",
    "StreamError",
    "__version__",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cirrus' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
