"""`cirrus tasks ...`: runs of `kind: task` APIs, a command group of the `cirrus` CLI (`cirrus/cli.py`)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated

import typer

from cirrus import cli_views as views
from cirrus.cli_common import ApiArgument, HomeOption, Output, OutputOption, _client, _errors, _print_json, _stdout

if TYPE_CHECKING:
    from cirrus.client import Client
    from cirrus.tasks import TaskRun

tasks_app = typer.Typer(
    help="Task runs: run a `kind: task` API's run(config) (or its command) once, to completion.",
    no_args_is_help=True,
)
RunArgument = Annotated[str, typer.Argument(help="task run id", show_default=False)]


@tasks_app.command("submit")
def tasks_submit(
    api: ApiArgument,
    config: Annotated[
        str | None, typer.Option("--config", help="JSON object given to run(config) ($CIRRUS_TASK_CONFIG to a command)")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="seconds an attempt may run (default: the spec's task.timeout_s)")
    ] = None,
    retries: Annotated[
        int | None, typer.Option("--retries", help="times a failed run runs again (default: the spec's task.retries)")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait until the run ends (exit 1 unless it succeeded)")] = False,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Submit one run of a task API; prints its id (`--wait`: then waits for it to end)."""
    with _errors():
        run_config = {} if config is None else _json_object("--config", config)
        if timeout is not None and timeout <= 0:
            raise ValueError(f"--timeout must be a positive number of seconds, not {timeout:g}")
        if retries is not None and retries < 0:
            raise ValueError(f"--retries must be 0 or more, not {retries}")
        client = _client(home)
        run = client.submit_task(api, run_config, timeout_s=timeout, retries=retries)
        if output is Output.table:
            typer.echo(run.id)
        if wait:
            run = client.wait_task(run.id)
            if output is Output.table:
                _stdout().print(run_view(run))
        if output is Output.json:
            _print_json(run.model_dump(mode="json"))
    if wait and run.status.value != "succeeded":
        raise typer.Exit(1)


@tasks_app.command("list")
def tasks_list(
    api: Annotated[str | None, typer.Argument(help="only this API's runs")] = None,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List task runs, newest first."""
    with _errors():
        runs = _client(home).tasks(api)
        if output is Output.json:
            _print_json([run.model_dump(mode="json") for run in runs])
            return
        if not runs:
            typer.echo("no task runs; submit one with `cirrus tasks submit API`")
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for column in ("RUN", "API", "STATUS", "ATTEMPTS", "CREATED", "REASON"):
            table.add_column(column, overflow="fold")
        for run in runs:
            table.add_row(
                run.id,
                run.api,
                views.styled(run.status.value),
                str(run.attempts),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.created_at)),
                (run.reason or "").splitlines()[0] if run.reason else "",
            )
        _stdout().print(table)


@tasks_app.command("get")
def tasks_get(
    run_id: RunArgument,
    wait: Annotated[bool, typer.Option("--wait", help="wait until the run ends (exit 1 unless it succeeded)")] = False,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Show a task run: status, attempts, exit reason, times."""
    with _errors():
        client = _client(home)
        run = client.wait_task(run_id) if wait else client.task(run_id)
        if output is Output.json:
            _print_json(run.model_dump(mode="json"))
        else:
            _stdout().print(run_view(run))
    if wait and run.status.value != "succeeded":
        raise typer.Exit(1)


@tasks_app.command("cancel")
def tasks_cancel(run_id: RunArgument, home: HomeOption = None, output: OutputOption = Output.table) -> None:
    """Cancel a task run: a pending one at once; a running one is stopped (SIGTERM, then SIGKILL)."""
    with _errors():
        run = _client(home).cancel_task(run_id)
        if output is Output.json:
            _print_json(run.model_dump(mode="json"))
        elif run.status.value == "cancelled":
            typer.echo(f"cancelled task run {run.id}")
        else:
            typer.echo(f"cancelling task run {run.id}: its process is being stopped")


def run_view(run: TaskRun) -> str:
    def stamp(at: float | None) -> str:
        return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))

    lines = [
        f"run:       {run.id}",
        f"api:       {run.api} (revision {run.revision})",
        f"status:    {run.status.value}",
        f"attempts:  {run.attempts} (failures {run.failures}, retries allowed {run.retries})",
        f"timeout:   {'-' if run.timeout_s is None else f'{run.timeout_s:g}s'}",
        f"created:   {stamp(run.created_at)}",
        f"started:   {stamp(run.started_at)}",
        f"ended:     {stamp(run.ended_at)}",
    ]
    if run.reason:
        lines.append(f"reason:    {run.reason}")
    if run.config:
        lines.append(f"config:    {json.dumps(run.config)[:500]}")
    lines.append(f"logs:      cirrus logs {run.api} --task {run.id}")
    return "\n".join(lines)


def _json_object(name: str, text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, e.g. '{{\"epochs\": 3}}'")
    return value


def print_task_logs(client: Client, api: str, run_id: str, lines: int, follow: bool) -> None:
    """`cirrus logs API --task ID [-f]`: the run's log, every attempt (ValueError: a run of another API)."""
    run = client.task(run_id)
    if run.api != api:
        raise ValueError(f"task run {run_id} is a run of {run.api}, not {api}: cirrus logs {run.api} --task {run_id}")
    if not follow:
        text = client.task_logs(run_id, lines=lines)
        if text:
            typer.echo(text, nl=not text.endswith("\n"))
        return
    try:
        for line in client.follow_task_logs(run_id, lines=lines):
            typer.echo(line)
    except KeyboardInterrupt:
        return
