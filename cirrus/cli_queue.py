"""Queue tools of the `cirrus` CLI (`cirrus/cli.py`) for async APIs: `cirrus dead-letters` (list, requeue)
and `cirrus requests ...` (list the pending requests, cancel one)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from cirrus.cli_common import ApiArgument, HomeOption, Output, OutputOption, _client, _errors, _print_json, _stdout

if TYPE_CHECKING:
    from cirrus.client import Client

PAYLOAD_CELL = 60  # characters of a payload a table shows (-o json: the whole preview)


def _async_only(client: Client, api: str, what: str) -> None:
    kind = client.get(api).kind
    if kind != "async":
        raise ValueError(f"API {api!r} is {kind}, not async: only an async API {what}")


def _payload_cell(record: dict[str, Any]) -> str:
    """The start of a request's payload, on one line."""
    if record.get("payload_encoding") == "base64":
        return f"<{record.get('payload_bytes', 0)} bytes of {record.get('payload_type') or 'binary'}>"
    text = " ".join(str(record.get("payload", "")).split())
    cut = len(text) > PAYLOAD_CELL or record.get("truncated", False)
    return text[:PAYLOAD_CELL] + ("…" if cut else "")


def _print_table(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    _stdout().print(table)


def dead_letters(
    api: ApiArgument,
    ids: Annotated[
        list[str] | None,
        typer.Argument(help="with --requeue: only these dead letters (default: all of them)", show_default=False),
    ] = None,
    requeue: Annotated[
        bool, typer.Option("--requeue", help="put the dead letters back in the queue, as new requests")
    ] = False,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 100,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List an async API's failed requests (dead letters) with their last error and the start of their
    payload (another kind exits 1); `--requeue [ID...]` runs them again (exit 1 if a named ID was no dead letter)."""
    with _errors():
        if ids and not requeue:
            raise ValueError("request ids go with --requeue: `cirrus dead-letters API --requeue ID ...`")
        client = _client(home)
        _async_only(client, api, "keeps dead letters")
        if requeue:
            _requeue(client, api, ids or None, output)
            return
        records = client.dead_letters(api, limit=limit)
        if output is Output.json:
            _print_json(records)
        elif not records:
            typer.echo(f"no dead letters in {api}")
        else:
            rows = [
                (r["id"], str(r["attempts"]), str(r["timestamps"]["finished"]), r.get("error", ""), _payload_cell(r))
                for r in records
            ]
            _print_table(("ID", "ATTEMPTS", "FAILED AT", "LAST ERROR", "PAYLOAD"), rows)


def _requeue(client: Client, api: str, ids: list[str] | None, output: Output) -> None:
    answer = client.requeue_dead_letters(api, ids)
    requeued, missing = answer["requeued"], answer["not_dead_letters"]
    if output is Output.json:
        _print_json(answer)
    else:
        typer.echo(f"requeued {len(requeued)} dead letter{'' if len(requeued) == 1 else 's'} of {api}")
        for request_id in requeued:
            typer.echo(f"  {request_id}")
    if missing:
        raise ValueError(f"not dead letters of {api}: {', '.join(missing)}")


class ListByDefault(TyperGroup):
    """`cirrus requests API` is `cirrus requests list API`: a first word that names no sub-command (nor
    asks for help) starts the arguments of `list` (an API named like a sub-command: `requests list NAME`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: the click Context Typer ships
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["list", *args]
        return super().parse_args(ctx, args)


requests_app = typer.Typer(
    cls=ListByDefault,
    help="An async API's pending requests: `cirrus requests API` lists them, `cirrus requests cancel ID` cancels one.",
    no_args_is_help=True,
)


class Pending(StrEnum):
    in_queue = "in_queue"
    in_progress = "in_progress"


@requests_app.command("list")
def requests_list(
    api: ApiArgument,
    status: Annotated[Pending | None, typer.Option(help="only these (default: both)", show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="at most this many, oldest first")] = 100,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List an async API's queued and in-progress requests, oldest first, with the start of their payload."""
    with _errors():
        client = _client(home)
        _async_only(client, api, "queues requests")
        records = client.requests(api, status=None if status is None else status.value, limit=limit)
        if output is Output.json:
            _print_json(records)
        elif not records:
            typer.echo(f"no {'pending' if status is None else status.value} requests in {api}")
        else:
            rows = [
                (r["id"], r["status"], str(r["attempts"]), str(r["timestamps"]["created"]), _payload_cell(r))
                for r in records
            ]
            _print_table(("ID", "STATUS", "ATTEMPTS", "CREATED", "PAYLOAD"), rows)


@requests_app.command("cancel")
def requests_cancel(
    request_id: Annotated[str, typer.Argument(metavar="ID", help="the request's id", show_default=False)],
    api: Annotated[str | None, typer.Option("--api", help="its API (default: search every async API)")] = None,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Cancel a queued or in-progress async request: it fails with the error "cancelled by the operator"
    (a dead letter, which `dead-letters --requeue` can run again). One that already finished exits 1."""
    with _errors():
        record = _client(home).cancel_request(request_id, api)
        if output is Output.json:
            _print_json(record)
        else:
            typer.echo(f"cancelled {record['id']} of {record['api']}")
