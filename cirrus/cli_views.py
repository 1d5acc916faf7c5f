"""What the CLI draws with Rich: API tables and detail, deploy progress, a job's state.

Kept apart from the commands (`cirrus/cli.py`): pure functions of status records to renderables.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import RenderableType

    from cirrus.jobs import Job
    from cirrus.types import ApiStatus


def job_view(job: Job) -> RenderableType:
    from rich.console import Group
    from rich.table import Table

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()

    def when(at: float | None) -> str:
        return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))

    rate = "-" if job.items_per_s is None else f"{job.items_per_s:,.1f} items/s"
    eta = "" if job.eta_s is None else f", ETA {job.eta_s:,.0f}s"
    rows: list[tuple[str, Any]] = [
        ("job", job.id),
        ("api", job.api),
        ("status", styled(job.status.value)),
        (
            "batches",
            f"{job.batches_done} done, {job.batches_failed} failed, {job.batches_in_progress} in progress, "
            f"{job.total_batches} total ({job.batch_size} items each)",
        ),
        ("items", f"{job.items_done} of {job.total_items} done, {rate}{eta}"),
        ("workers", str(job.workers)),
        ("created", when(job.created_at)),
        ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
        ("results", job.sink),
    ]
    if job.retry_of:
        rows.append(("retry of", job.retry_of))
    if job.error:
        rows.append(("error", job.error))
    if job.hook_error:
        rows.append(("on_job_complete", job.hook_error))
    for key, value in rows:
        summary.add_row(key, value)
    if not job.failed_batches:
        return summary
    failed = Table(box=None, header_style="bold")
    for column in ("FAILED BATCH", "ITEMS", "LAST ERROR"):
        failed.add_column(column, overflow="fold")
    for batch in job.failed_batches:
        failed.add_row(str(batch.index), f"{batch.start}-{batch.start + batch.size - 1}", batch.error or "")
    return Group(summary, "", failed)


# Helpers.


def progress(statuses: list[ApiStatus]) -> str:
    return ", ".join(f"{s.name} {s.status} {s.replicas_ready}/{s.replicas_desired}" for s in statuses)


def waiting_view(spinner: RenderableType, statuses: list[ApiStatus]) -> RenderableType:
    """The spinner, and under it a progress bar per model fetched from a URL (local models need no fetch)."""
    from rich.console import Group
    from rich.filesize import decimal
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    from cirrus.cli_envs import env_rows

    models = [(s.name, m) for s in statuses for m in s.models if "://" in m.source]
    envs = env_rows(statuses)  # APIs' own Python environments being built
    if not models and not envs:
        return spinner
    env_table = Table.grid(padding=(0, 1))
    for label, text in envs:
        env_table.add_row(label, text)
    table = Table.grid(padding=(0, 1))
    for api, model in models:
        done = model.total_bytes if model.state == "ready" else model.done_bytes
        percent = 100 * done / model.total_bytes if model.total_bytes else (100 if model.state == "ready" else 0)
        table.add_row(
            f"model {model.name} ({api})",
            ProgressBar(total=max(model.total_bytes, 1), completed=min(done, max(model.total_bytes, 1)), width=30),
            f"{percent:3.0f}%",
            f"{decimal(done)}/{decimal(model.total_bytes)}",
            styled(model.state),
        )
    return Group(spinner, env_table, table)


def model_lines(statuses: list[ApiStatus]) -> dict[str, str]:
    """Plain text for piped output: a line per model fetched from a URL, by model, its percent in
    steps of ten (so a script's log gets a line per step, not one per poll)."""
    from rich.filesize import decimal

    lines = {}
    for s in statuses:
        for model in s.models:
            if "://" not in model.source:
                continue
            done = model.total_bytes if model.state == "ready" else model.done_bytes
            percent = 100 * done // model.total_bytes if model.total_bytes else (100 if model.state == "ready" else 0)
            step = f"{percent // 10 * 10}% of {decimal(model.total_bytes)}"
            lines[f"{s.name}/{model.name}"] = f"model {model.name} ({s.name}) {step} {model.state}"
    return lines


_STATUS_STYLE = {
    "live": "green",
    "ready": "green",
    "error": "red",
    "backoff": "red",
    "degraded": "yellow",
    "draining": "yellow",
    "starting": "cyan",
    "updating": "cyan",
    "canary": "cyan",
    "pending": "magenta",
    "running": "cyan",
    "stopping": "yellow",
    "succeeded": "green",
    "completed_with_failures": "yellow",
    "failed": "red",
    "cancelled": "yellow",
    "timed_out": "red",
}


def styled(status: str) -> Any:
    from rich.text import Text

    return Text(status, style=_STATUS_STYLE.get(status, ""))


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def request_rows(s: ApiStatus) -> list[tuple[str, Any]]:
    return [
        ("requests", f"{s.requests_last_minute} last minute, {s.in_flight} in flight, {s.queued} queued"),
        ("latency", f"p50 {ms(s.p50_ms)} ms, p99 {ms(s.p99_ms)} ms"),
    ]


def backlog_rows(s: ApiStatus) -> list[tuple[str, Any]]:
    """An async API's requests: what waits in its queue, what runs, how old the oldest
    waiting one is, and how long one takes from arrival to result (none for other kinds)."""
    if s.backlog_in_queue is None:
        return []
    oldest = "" if s.backlog_oldest_age_s is None else f", the oldest waiting {seconds(s.backlog_oldest_age_s)}"
    return [
        ("requests", f"{s.requests_last_minute} last minute"),
        ("backlog", f"{s.backlog_in_queue} queued, {s.backlog_in_progress} in progress{oldest}"),
        ("processing", f"arrival to result p50 {seconds(s.result_latency_p50_s)} (last minute)"),
    ]


def apis_table(statuses: list[ApiStatus], gateway_url: str) -> RenderableType:
    from rich.table import Table

    if not statuses:
        return "no APIs deployed; deploy one with `cirrus deploy`"
    table = Table(box=None, header_style="bold")
    for column in ("API", "KIND", "STATUS", "READY/DESIRED", "PENDING", "REQ/MIN", "P50 MS", "P99 MS", "ENDPOINT"):
        numeric = column in {"PENDING", "REQ/MIN", "P50 MS", "P99 MS"}
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for s in statuses:
        replicas = f"{s.replicas_ready}/{s.replicas_desired}"
        table.add_row(
            s.name,
            s.kind,
            styled(s.status),
            replicas,
            str(s.replicas_pending),
            str(s.requests_last_minute),
            ms(s.p50_ms),
            ms(s.p99_ms),
            endpoint(gateway_url, s.name),
        )
    return table


def api_view(s: ApiStatus, gateway_url: str) -> RenderableType:
    from rich.console import Group
    from rich.table import Table

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    rows: list[tuple[str, Any]] = [
        ("API", s.name),
        ("kind", s.kind),
        ("status", styled(s.status)),
        ("revision", str(s.revision)),
        ("replicas", f"{s.replicas_ready} ready, {s.replicas_desired} desired, {s.replicas_pending} pending"),
        *(backlog_rows(s) or request_rows(s)),
        ("endpoint", endpoint(gateway_url, s.name)),
    ]
    if s.autoscaler:
        rows.append(("autoscaler", s.autoscaler))
    for model in s.models:
        progress = ""
        if model.state == "fetching" and model.total_bytes:
            progress = f" {100 * model.done_bytes / model.total_bytes:.0f}% of {model.total_bytes / 2**30:.2f} GiB"
        where = model.error if model.state == "failed" else (model.path or model.source)
        rows.append((f"model {model.name}", f"{model.state}{progress}: {where}"))
    if s.environment is not None:
        from cirrus.cli_envs import env_line

        rows.append(("environment", env_line(s.environment)))
    if s.batch_size_mean is not None:
        rows.append(
            (
                "inference",
                f"batch size {s.batch_size_mean:.3g} mean, slot wait p50 {ms(s.slot_wait_p50_ms)} ms, "
                f"predict p50 {ms(s.predict_p50_ms)} ms",
            )
        )
    if s.cold_starts:
        rows.append(("cold starts", f"{s.cold_starts}, the last took {seconds(s.last_cold_start_s)}"))
    if s.message:
        rows.append(("message", s.message))
    for key, value in rows:
        summary.add_row(key, value)
    parts: list[RenderableType] = [summary]
    if s.traffic:
        parts += ["", traffic_table(s)]
    if not s.replicas:
        return Group(*parts, "", "no replicas" if s.kind != "splitter" else "no replicas of its own")
    replicas = Table(box=None, header_style="bold")
    for column in ("REPLICA", "REVISION", "STATE", "PID", "DEVICES", "RESTARTS", "IN FLIGHT", "WHY / LAST ERROR"):
        replicas.add_column(column, overflow="fold")
    for r in s.replicas:
        replicas.add_row(
            r.id,
            str(r.revision),
            styled(r.state),
            str(r.pid or "-"),
            " ".join(f"{k}={v}" for k, v in r.devices.items()) or "-",
            str(r.restarts),
            str(r.in_flight),
            r.reason or r.last_error or "",
        )
    return Group(*parts, "", replicas)


def traffic_table(s: ApiStatus) -> RenderableType:
    """Where the last minute's requests went: a canary's two revisions, or a splitter's APIs."""
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("TO", "ROLE", "WEIGHT", "READY", "REQ/MIN", "ERRORS", "ERROR RATE", "P50 MS", "P99 MS"):
        table.add_column(column, justify="left" if column in ("TO", "ROLE") else "right")
    for t in s.traffic:
        rate = t.error_rate
        table.add_row(
            t.target,
            t.role,
            "copy" if t.weight is None else f"{t.weight:g}%",
            "-" if t.replicas_ready is None else str(t.replicas_ready),
            str(t.requests),
            str(t.errors),
            "-" if rate is None else f"{100 * rate:.1f}%",
            ms(t.p50_ms),
            ms(t.p99_ms),
        )
    return table


def endpoint(gateway_url: str, name: str) -> str:
    return f"{gateway_url.rstrip('/')}/{name}"
