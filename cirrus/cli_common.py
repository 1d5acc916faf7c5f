"""What the `cirrus` CLI's modules share: output formats, common options, error handling, the client."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cirrus.settings import Settings

if TYPE_CHECKING:
    from rich.console import Console

    from cirrus.client import Client


class Output(StrEnum):
    table = "table"
    json = "json"


RequireKeysOption = Annotated[
    bool | None,
    typer.Option(
        "--require-keys/--no-require-keys",
        help="every API needs an API key (default: yes when --host is not a loopback address)",
        show_default=False,
    ),
]
InsecureOption = Annotated[
    bool, typer.Option("--insecure-no-auth", help="serve a non-loopback host with no API keys (trusted networks only)")
]
TlsCertOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        help="serve the gateway over HTTPS with this PEM certificate (chain); needs --tls-key "
        "(default: $CIRRUS_TLS_CERT)",
        show_default=False,
    ),
]
TlsKeyOption = Annotated[
    Path | None,
    typer.Option("--tls-key", help="the PEM private key of --tls-cert (default: $CIRRUS_TLS_KEY)", show_default=False),
]
HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="state directory (default: $CIRRUS_HOME or ~/.cirrus)", show_default=False),
]
HostOption = Annotated[str | None, typer.Option("--host", help="address to bind (default: $CIRRUS_HOST or 127.0.0.1)")]
PortOption = Annotated[int | None, typer.Option("--port", help="gateway port (default: $CIRRUS_PORT or 8888)")]
GrpcPortOption = Annotated[
    int | None,
    typer.Option(
        "--grpc-port",
        help="also serve the Open Inference Protocol v2 over gRPC on this port (0: any free port; needs the "
        "grpc extra; default: $CIRRUS_GRPC_PORT, else off)",
        show_default=False,
        min=0,
        max=65535,
    ),
]
AdminPortOption = Annotated[
    int | None, typer.Option("--admin-port", help="admin API port (default: $CIRRUS_ADMIN_PORT or 8889)")
]
AdminHostOption = Annotated[
    str | None,
    typer.Option(
        "--admin-host",
        help="address the admin API binds (default: $CIRRUS_ADMIN_HOST or 127.0.0.1); another than loopback is "
        "for trusted networks only: the admin token is its only protection",
        show_default=False,
    ),
]
OutputOption = Annotated[Output, typer.Option("--output", "-o", help="output format")]
ApiArgument = Annotated[str, typer.Argument(help="API name", show_default=False)]


@contextmanager
def _errors() -> Iterator[None]:
    """Expected failures become one red line on stderr and exit 1; Ctrl-C exits 130 quietly, and so
    does a closed pipe (141)."""
    from cirrus.client import CirrusError

    try:
        yield
    except (CirrusError, ValueError) as exc:  # SpecError and bad settings are ValueErrors
        _stderr().print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BrokenPipeError:  # the reader went away (`cirrus get -w -o json | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        raise typer.Exit(141) from None


def _tls(cert: Path | None, key: Path | None) -> dict[str, object]:
    """`--tls-cert`/`--tls-key` as Settings overrides (absolute paths: the daemon may run elsewhere)."""
    given = {"tls_cert": cert, "tls_key": key}
    return {name: str(path.expanduser().resolve()) if path else None for name, path in given.items()}


def _settings(
    home: Path | None,
    host: str | None = None,
    port: int | None = None,
    admin_port: int | None = None,
    **more: object,
) -> Settings:
    home = home.expanduser().resolve() if home else None
    return Settings.from_env().with_overrides(home=home, host=host, gateway_port=port, admin_port=admin_port, **more)


def _client(
    home: Path | None,
    host: str | None = None,
    port: int | None = None,
    admin_port: int | None = None,
    **more: object,
) -> Client:
    from cirrus.client import Client

    return Client(_settings(home, host, port, admin_port, **more))


# Piped output (not a terminal) is for scripts: no colours or escape codes, no animation, and a table
# row stays one line however long its cells (a console this wide never wraps).
PIPED_WIDTH = 100_000


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _console(stderr: bool, **options: Any) -> Console:
    from rich.console import Console

    if is_terminal(sys.stderr if stderr else sys.stdout):
        return Console(stderr=stderr, **options)
    return Console(stderr=stderr, width=PIPED_WIDTH, color_system=None, force_terminal=False, **options)


def _stdout() -> Console:
    return _console(False, markup=False, highlight=False)  # names and errors are data, never markup


def _stderr() -> Console:
    return _console(True)


def _status(text: str) -> AbstractContextManager[object]:
    """A spinner on stderr while something runs, on a terminal only (piped, nothing is drawn)."""
    if not is_terminal(sys.stderr):
        return nullcontext()
    return _stderr().status(text)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _print_json_line(data: Any) -> None:
    """One compact JSON document on one line, flushed at once (NDJSON for a watching script)."""
    sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
    sys.stdout.flush()
