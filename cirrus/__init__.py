"""Cirrus: serverless inference for machine learning.

`import cirrus` stays light: the client and the predictor helpers load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cirrus.client import CirrusError, Client
    from cirrus.predictor import HTTPError, Response

__version__ = "0.1.0"
__all__ = ["CirrusError", "Client", "HTTPError", "Response", "__version__"]

_LAZY = {
    "Client": "cirrus.client",
    "CirrusError": "cirrus.client",
    "Response": "cirrus.predictor",
    "HTTPError": "cirrus.predictor",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cirrus' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
