"""`cirrus dashboard`: a one-time login link to the daemon's dashboard (`cirrus/admin_dashboard.py`),
printed, and opened in a browser when there is one to open."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from cirrus.cli_common import HomeOption, Output, OutputOption, _client, _errors, _print_json, is_terminal


def _can_open_browser() -> bool:
    """Whether a person at a graphical session runs this: a terminal, and a display (or macOS/Windows)."""
    if not is_terminal(sys.stdout) or not is_terminal(sys.stdin):
        return False
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def dashboard(
    no_browser: Annotated[bool, typer.Option("--no-browser", help="print the link only; open no browser")] = False,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Open the live dashboard: prints a login link (valid once, for 60 s; the browser then stays
    logged in, read-only, for 12 hours or until the daemon restarts) and opens it in a browser when it can."""
    with _errors():
        login = _client(home).dashboard_login()
        if output is Output.json:
            _print_json(login)
            return
        typer.echo(login["url"])
        if not no_browser and _can_open_browser():
            import webbrowser

            if webbrowser.open(login["url"]):
                typer.echo("opened in your browser (the link works once, for 60 s)", err=True)
                return
        typer.echo("open it in a browser within 60 s (it works once)", err=True)
