"""`cirrus envs ...`: the cached Python environments of APIs (`python:` in a spec), a command group
of the `cirrus` CLI (`cirrus/cli.py`); and how an API's environment shows in `cirrus deploy` and
`cirrus get API`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

from cirrus.cli_common import HomeOption, Output, OutputOption, _client, _errors, _print_json, _stdout

if TYPE_CHECKING:
    from cirrus.types import ApiStatus, EnvEntry, EnvStatus

envs_app = typer.Typer(
    help="APIs' own Python environments (`python:` in a spec): cached by their resolved requirements.",
    no_args_is_help=True,
)


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


@envs_app.command("list")
def envs_list(home: HomeOption = None, output: OutputOption = Output.table) -> None:
    """List the cached environments: key, state, size, last use and the API revisions using each."""
    with _errors():
        found = _client(home).envs()
        if output is Output.json:
            _print_json([e.model_dump(mode="json") for e in found])
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for column in ("ENV", "STATE", "SIZE", "LAST USED", "USED BY", "PACKAGES"):
            table.add_column(column, overflow="fold")
        for e in found:
            packages = ", ".join(e.requirements[:4]) + (
                f" (+{len(e.requirements) - 4})" if len(e.requirements) > 4 else ""
            )
            table.add_row(
                e.key, e.state, _mb(e.size_bytes), _when(e.last_used), ", ".join(e.used_by) or "-", packages or "-"
            )
        total = sum(e.size_bytes for e in found)
        _stdout().print(table if found else "no cached environments")
        if found:
            _stdout().print(f"{len(found)} environment(s), {_mb(total)}")


@envs_app.command("prune")
def envs_prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what would be removed")] = False,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Remove every cached environment no API revision uses (and unfinished builds); print what it freed."""
    with _errors():
        removed = _client(home).prune_envs(dry_run=dry_run)
        if output is Output.json:
            _print_json([e.model_dump(mode="json") for e in removed])
            return
        verb = "would remove" if dry_run else "removed"
        for e in removed:
            typer.echo(f"{verb} {e.key}  {_mb(e.size_bytes)}  ({e.state})")
        freed = sum(e.size_bytes for e in removed)
        typer.echo(f"{verb} {len(removed)} environment(s), {'would free' if dry_run else 'freed'} {_mb(freed)}")


# --- an API's environment in `cirrus deploy` and `cirrus get API` -------------------------------------


def env_line(env: EnvStatus) -> str:
    """One line on an API's environment: its state, what it is, and the log or the installer's message."""
    if env.state == "ready":
        how = "reused from the cache" if env.reused else f"built in {env.build_s:.1f}s" if env.build_s else "ready"
        return f"ready ({how}): {env.key}"
    if env.state == "failed":
        return f"failed: {env.error} (log: {env.log})"
    return f"{env.state}{' ' + env.key if env.key else ''} (log: {env.log})"


def env_lines(statuses: list[ApiStatus]) -> dict[str, str]:
    """Plain text for piped `cirrus deploy`: a line per API environment, by API (printed when it changes)."""
    return {f"{s.name}/env": f"environment ({s.name}) {env_line(s.environment)}" for s in statuses if s.environment}


def env_rows(statuses: list[ApiStatus]) -> list[tuple[str, str]]:
    """(label, text) rows on the environments of the APIs that have one, for the deploy spinner."""
    return [(f"environment ({s.name})", env_line(s.environment)) for s in statuses if s.environment]


def entry_summary(e: EnvEntry) -> str:
    return f"{e.key} {e.state} {_mb(e.size_bytes)}"
