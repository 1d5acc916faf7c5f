"""`cirrus jobs ...`: batch jobs, a command group of the `cirrus` CLI (`cirrus/cli.py`)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cirrus import cli_views as views
from cirrus.cli_common import (
    ApiArgument,
    HomeOption,
    Output,
    OutputOption,
    _client,
    _errors,
    _print_json,
    _stderr,
    _stdout,
)

if TYPE_CHECKING:
    from cirrus.client import Client
    from cirrus.jobs import Job

# Batch jobs.

jobs_app = typer.Typer(
    help="Batch jobs: run a list of items through a `kind: batch` API's predict_batch.", no_args_is_help=True
)
JobArgument = Annotated[str, typer.Argument(help="job id", show_default=False)]
FollowOption = Annotated[
    bool, typer.Option("--follow", "-f", help="show a progress bar until the job ends (exit 1 unless it succeeded)")
]


@jobs_app.command("submit")
def jobs_submit(
    api: ApiArgument,
    items: Annotated[
        str | None,
        typer.Option("--items", help="JSONL file (one JSON value per line) or .json array: a path or an fsspec URL"),
    ] = None,
    items_json: Annotated[str | None, typer.Option("--items-json", help="the items as a JSON array")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="items per predict_batch call")] = 32,
    workers: Annotated[int, typer.Option("--workers", help="worker replicas")] = 1,
    timeout: Annotated[float | None, typer.Option("--timeout", help="time limit of the whole job, seconds")] = None,
    max_attempts: Annotated[
        int | None, typer.Option("--max-attempts", help="deliveries of a batch before it fails (default: the API's)")
    ] = None,
    config: Annotated[
        str | None, typer.Option("--config", help="JSON object merged over predictor.config for this job")
    ] = None,
    sink: Annotated[
        str | None, typer.Option("--sink", help="results directory or fsspec URL (default $CIRRUS_HOME/jobs/ID/)")
    ] = None,
    follow: FollowOption = False,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Submit a batch job: its items are split into batches that workers run through predict_batch."""
    with _errors():
        if (items is None) == (items_json is None):
            raise ValueError("give the items with either --items FILE|URL or --items-json '[...]'")
        inline = None if items_json is None else _json_option("--items-json", items_json, list)
        job_config = {} if config is None else _json_option("--config", config, dict)
        client = _client(home)
        job = client.submit_job(
            api,
            inline,
            items_url=items,
            batch_size=batch_size,
            workers=workers,
            timeout_s=timeout,
            max_attempts=max_attempts,
            config=job_config,
            sink=sink,
        )
        if follow:
            job = _follow_job(client, job.id, output)
        elif output is Output.table:
            typer.echo(f"submitted job {job.id}: {job.total_items} items in {job.total_batches} batches")
            typer.echo(f"  follow it with `cirrus jobs get {job.id} -f`; results go to {job.sink}")
        if output is Output.json:
            _print_json(job.model_dump(mode="json"))
        _exit_for(job, follow)


@jobs_app.command("list")
def jobs_list(
    api: Annotated[str | None, typer.Argument(help="only this API's jobs")] = None,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List batch jobs, newest first."""
    with _errors():
        jobs = _client(home).jobs(api)
        if output is Output.json:
            _print_json([job.model_dump(mode="json") for job in jobs])
            return
        if not jobs:
            typer.echo("no jobs; submit one with `cirrus jobs submit API --items FILE`")
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for column in ("JOB", "API", "STATUS", "BATCHES DONE/FAILED/TOTAL", "ITEMS", "CREATED"):
            table.add_column(column, overflow="fold")
        for job in jobs:
            table.add_row(
                job.id,
                job.api,
                views.styled(job.status.value),
                f"{job.batches_done}/{job.batches_failed}/{job.total_batches}",
                str(job.total_items),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at)),
            )
        _stdout().print(table)


@jobs_app.command("get")
def jobs_get(
    job_id: JobArgument, follow: FollowOption = False, home: HomeOption = None, output: OutputOption = Output.table
) -> None:
    """Show a job: status, progress (batches, items/s, ETA), failed batches, where its results are."""
    with _errors():
        client = _client(home)
        if follow:
            job = _follow_job(client, job_id, output)
        else:
            job = client.job(job_id)
            if output is Output.table:
                _stdout().print(views.job_view(job))
        if output is Output.json:
            _print_json(job.model_dump(mode="json"))
        _exit_for(job, follow)


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobArgument, home: HomeOption = None, output: OutputOption = Output.table) -> None:
    """Cancel a pending or running job: its workers stop once their batches in flight finish; results stay."""
    with _errors():
        job = _client(home).cancel_job(job_id)
        if output is Output.json:
            _print_json(job.model_dump(mode="json"))
        elif job.status.value == "stopping":
            typer.echo(f"cancelling job {job.id}: the batches in flight finish, then it is cancelled")
        else:
            typer.echo(f"cancelled job {job.id}")


@jobs_app.command("retry")
def jobs_retry(
    job_id: JobArgument, follow: FollowOption = False, home: HomeOption = None, output: OutputOption = Output.table
) -> None:
    """Run an ended job's failed (or never run) batches and failed items again, as a new job."""
    with _errors():
        client = _client(home)
        job = client.retry_job(job_id)
        if follow:
            job = _follow_job(client, job.id, output)
        elif output is Output.table:
            typer.echo(f"retrying job {job_id} as job {job.id}: {job.total_items} items in {job.total_batches} batches")
            typer.echo(f"  follow it with `cirrus jobs get {job.id} -f`; results go to {job.sink}")
        if output is Output.json:
            _print_json(job.model_dump(mode="json"))
        _exit_for(job, follow)


def _json_option(name: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {'array' if kind is list else 'object'}")
    return value


def _exit_for(job: Job, follow: bool) -> None:
    if follow and job.status.value != "succeeded":
        raise typer.Exit(1)


def _follow_job(client: Client, job_id: str, output: Output) -> Job:
    """Poll the job until it ends, with a Rich progress bar on a terminal (on stderr with `-o json`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = _stderr() if output is Output.json else _stdout()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches  {task.fields[rate]}  {task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:  # piped: none
        task = bar.add_task(job_id, total=None, rate="", eta="")

        def show(job: Job) -> None:
            rate = "" if job.items_per_s is None else f"{job.items_per_s:,.0f} items/s"
            eta = "" if job.eta_s is None else f"ETA {job.eta_s:,.0f}s"
            failed = f", {job.batches_failed} failed" if job.batches_failed else ""
            bar.update(
                task,
                description=f"{job.id} {job.status.value}{failed}",
                total=job.total_batches,
                completed=job.batches_done + job.batches_failed,
                rate=rate,
                eta=eta,
            )

        job = client.wait_job(job_id, on_poll=show)
    if output is Output.table:
        _stdout().print(views.job_view(job))
    return job
