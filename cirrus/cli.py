"""The `cirrus` command: a thin Typer + Rich layer over `cirrus.client.Client`.

Every command builds its Settings from the environment plus its flags, calls the client, and
prints a table (default) or JSON (`-o json`). Expected failures print one red line and exit 1.
"""

from __future__ import annotations

import json
import mimetypes
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cirrus import cli_views as views
from cirrus.cli_common import (
    AdminHostOption,
    AdminPortOption,
    ApiArgument,
    GrpcPortOption,
    HomeOption,
    HostOption,
    InsecureOption,
    Output,
    OutputOption,
    PortOption,
    RequireKeysOption,
    TlsCertOption,
    TlsKeyOption,
    _client,
    _errors,
    _print_json,
    _print_json_line,
    _settings,
    _status,
    _stderr,
    _stdout,
    _tls,
    is_terminal,
)
from cirrus.cli_dashboard import dashboard
from cirrus.cli_envs import env_lines, envs_app
from cirrus.cli_jobs import jobs_app
from cirrus.cli_queue import dead_letters, requests_app
from cirrus.cli_tasks import tasks_app

if TYPE_CHECKING:
    from rich.console import RenderableType

    from cirrus.client import Client
    from cirrus.types import ApiStatus, DeployResult

app = typer.Typer(
    name="cirrus",
    help="Serverless inference for machine learning: write a predictor, get an autoscaling API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    app()


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        from cirrus import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.command()
def up(
    home: HomeOption = None,
    host: HostOption = None,
    port: PortOption = None,
    admin_port: AdminPortOption = None,
    admin_host: AdminHostOption = None,
    grpc_port: GrpcPortOption = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the daemon")] = 30,
    require_keys: RequireKeysOption = None,
    insecure_no_auth: InsecureOption = False,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    runtime: Annotated[
        str | None,
        typer.Option("--runtime", help="where replicas run: local or ray (default: $CIRRUS_RUNTIME or local)"),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="the Ray cluster, HOST:PORT (default: $CIRRUS_RAY_ADDRESS, $RAY_ADDRESS)"),
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """Start the local Cirrus daemon (gateway, controller and admin API) in the background.

    On a host other machines can reach, every API needs an API key (`cirrus keys create`), and the
    daemon refuses to start while none exists, unless `--insecure-no-auth`. With `--tls-cert` and
    `--tls-key` the gateway serves HTTPS (the admin API stays plain HTTP on loopback)."""
    with _errors():
        client = _client(
            home,
            host,
            port,
            admin_port,
            admin_host=admin_host,
            grpc_port=grpc_port,
            require_keys=require_keys,
            insecure_no_auth=insecure_no_auth or None,
            runtime=runtime,
            ray_address=ray_address,
            **_tls(tls_cert, tls_key),
        )
        was_running = client.ping() is not None
        with _status("starting the Cirrus daemon"):
            info = client.up(timeout=timeout)
        if output is Output.json:
            _print_json(info.model_dump(mode="json"))
            return
        state = "is already running" if was_running else "started"
        typer.echo(
            f"Cirrus daemon {state} (pid {info.pid})\n  gateway: {info.gateway_url}\n  admin:   {info.admin_url}"
            + (f"\n  grpc:    {info.grpc_address}" if info.grpc_address else "")
        )


@app.command()
def down(
    home: HomeOption = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the daemon to stop")] = 30,
) -> None:
    """Stop the local Cirrus daemon and every replica it runs."""
    with _errors():
        stopped = _client(home).down(timeout=timeout)
        typer.echo("Cirrus daemon stopped" if stopped else "the Cirrus daemon is not running")


@app.command()
def deploy(
    path: Annotated[Path, typer.Argument(help="a spec file, or a directory holding cirrus.yaml")] = Path("."),
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until every API is live")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the APIs to become live")] = 300,
    force: Annotated[bool, typer.Option("--force", help="a new revision even if nothing changed")] = False,
    canary: Annotated[
        float | None,
        typer.Option(
            "--canary",
            metavar="PERCENT",
            help="the new revision takes this percent of requests beside the serving one, until "
            "`cirrus promote` (or `cirrus rollback` aborts it)",
        ),
    ] = None,
    home: HomeOption = None,
    host: HostOption = None,
    port: PortOption = None,
    admin_port: AdminPortOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Deploy (or update) the APIs of a spec, starting the daemon if needed.

    The spec's directory is packed into an immutable snapshot (minus what `.cirrusignore` lists):
    replicas run that snapshot, so later edits change nothing until the next deploy."""
    with _errors():
        client = _client(home, host, port, admin_port)
        with _status("deploying"):
            results = client.deploy(path, wait=False, force=force, canary=canary)
        _wait_for(client, results, wait, timeout, output)


@app.command()
def revisions(
    api: Annotated[str, typer.Argument(help="the API")],
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List an API's revisions (immutable snapshots), marking the one serving and the one rolling out."""
    with _errors():
        found = _client(home).revisions(api)
        if output is Output.json:
            _print_json([r.model_dump(mode="json") for r in found])
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for column in ("REVISION", "CREATED", "SNAPSHOT", "FROM", "ROLE"):
            table.add_column(column)
        for r in found:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
            table.add_row(str(r.revision), created, (r.snapshot or "-")[:12], r.note or "-", r.role or "-")
        _stdout().print(table)


@app.command()
def rollback(
    api: Annotated[str, typer.Argument(help="the API")],
    to: Annotated[int | None, typer.Option("--to", help="the revision to serve again (default: the previous)")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until it is live")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the API to become live")] = 300,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Abort a running canary, or serve an older revision's snapshot again, as a new revision, through a
    rolling update."""
    with _errors():
        client = _client(home)
        _wait_for(client, [client.rollback(api, to)], wait, timeout, output)


@app.command()
def promote(
    api: Annotated[str, typer.Argument(help="the API")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until it is live")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the API to become live")] = 300,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Finish a canary rollout: its revision takes every request; the old one drains (nothing dropped)."""
    with _errors():
        client = _client(home)
        _wait_for(client, [client.promote(api)], wait, timeout, output)


def _wait_for(client: Client, results: list[DeployResult], wait: bool, timeout: float, output: Output) -> None:
    """Print what a deploy (or rollback) did and, with `wait`, wait until every API is live."""
    gateway_url = client.daemon_info().gateway_url
    if output is Output.table:
        for result in results:
            typer.echo(
                f"{result.action:<9} {result.name}  revision {result.revision}  "
                f"{views.endpoint(gateway_url, result.name)}"
            )
    if wait:
        _wait_live(client, results, timeout)
        if output is Output.table:
            typer.echo("all APIs are live" if len(results) > 1 else f"{results[0].name} is live")
    if output is Output.json:
        _print_json([result.model_dump(mode="json") for result in results])


def _wait_live(client: Client, results: list[DeployResult], timeout: float) -> None:
    """Wait until every API is live: a spinner (and a bar per model fetched) on a terminal; piped, a
    plain stderr line each time the APIs' progress or a model's fetch changes."""
    err = _stderr()
    if not is_terminal(sys.stderr):
        printed: dict[str, str] = {}

        def note(statuses: list[ApiStatus]) -> None:
            lines = {"": f"waiting: {views.progress(statuses)}", **views.model_lines(statuses), **env_lines(statuses)}
            for key, line in lines.items():
                if printed.get(key) != line:
                    printed[key] = line
                    typer.echo(line, err=True)

        client.wait_until_live(results, timeout=timeout, on_poll=note)
        return
    from rich.live import Live
    from rich.spinner import Spinner

    spinner = Spinner("dots", "waiting for the APIs to become live")
    with Live(spinner, console=err, refresh_per_second=8) as live:

        def show(statuses: list[ApiStatus]) -> None:
            spinner.update(text=f"waiting: {views.progress(statuses)}")
            live.update(views.waiting_view(spinner, statuses))

        client.wait_until_live(results, timeout=timeout, on_poll=show)


@app.command()
def get(
    api: Annotated[str | None, typer.Argument(help="show one API and its replicas")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes with --watch")] = 2.0,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List the deployed APIs, or show one API with its replicas.

    With `--watch` it refreshes every `--interval` seconds: in place on a terminal; piped, each
    snapshot is printed (and flushed) after the last, and `-o json` prints one JSON document per
    line (NDJSON)."""
    with _errors():
        client = _client(home)

        def data() -> Any:
            if api:
                return client.get(api).model_dump(mode="json")
            return [status.model_dump(mode="json") for status in client.get()]

        def render() -> RenderableType:
            gateway_url = client.daemon_info().gateway_url
            if api:
                return views.api_view(client.get(api), gateway_url)
            return views.apis_table(client.get(), gateway_url)

        if not watch and output is Output.json:
            _print_json(data())
        elif not watch:
            _stdout().print(render())
        else:
            _watch(render, data, output, interval)


def _watch(render: Callable[[], RenderableType], data: Callable[[], Any], output: Output, interval: float) -> None:
    try:
        if output is Output.table and is_terminal(sys.stdout):
            _watch_live(render, interval)
        else:
            _watch_snapshots(data if output is Output.json else render, output, interval)
    except KeyboardInterrupt:
        return


def _watch_live(render: Callable[[], RenderableType], interval: float) -> None:
    from rich.live import Live

    with Live(render(), console=_stdout(), auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(render(), refresh=True)


def _watch_snapshots(snapshot: Callable[[], Any], output: Output, interval: float) -> None:
    """Piped `get -w`: every snapshot printed and flushed at once (a JSON line each with `-o json`)."""
    console = _stdout()
    while True:
        if output is Output.json:
            _print_json_line(snapshot())
        else:
            console.print(snapshot())
            console.print()
            sys.stdout.flush()
        time.sleep(interval)


@app.command()
def logs(
    api: ApiArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="how many recent lines to show")] = 100,
    task: Annotated[str | None, typer.Option("--task", help="only this task run's log (all its attempts)")] = None,
    home: HomeOption = None,
) -> None:
    """Print the logs of an API's replicas, each line prefixed with its replica id."""
    with _errors():
        client = _client(home)
        if task is not None:
            from cirrus.cli_tasks import print_task_logs

            print_task_logs(client, api, task, lines, follow)
            return
        if not follow:
            text = client.logs(api, lines=lines)
            if text:
                typer.echo(text, nl=not text.endswith("\n"))
            return
        try:
            for line in client.follow_logs(api, lines=lines):
                typer.echo(line)
        except KeyboardInterrupt:
            return


@app.command()
def predict(
    api: ApiArgument,
    payload: Annotated[str, typer.Argument(help="JSON text, @FILE to send a file as is, or @- for stdin")],
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="extra header 'Name: value' (repeatable)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer (each chunk of a stream)")] = 60,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Send one request to an API and print the answer, a stream chunk by chunk as it arrives.

    Non-2xx, or a stream that fails midway, exits 1. `-o json` prints {"status", "headers", "body"}
    (a JSON answer parsed; "body_base64" for bytes; "error" when a stream failed) once it has ended."""
    with _errors():
        body, headers = _read_payload(payload)
        headers.update(_parse_headers(header or []))
        from cirrus import cli_predict

        code = cli_predict.predict(_client(home), api, body, headers, timeout, output is Output.json)
    if code:
        raise typer.Exit(code)


@app.command()
def delete(api: ApiArgument, home: HomeOption = None, output: OutputOption = Output.table) -> None:
    """Delete an API and stop its replicas."""
    with _errors():
        _client(home).delete(api)
        if output is Output.json:
            _print_json({"deleted": api})
        else:
            typer.echo(f"deleted {api}")


app.command("dead-letters")(dead_letters)
app.command("dashboard")(dashboard)


@app.command()
def serve(
    path: Annotated[Path, typer.Argument(help="a spec file, or a directory holding cirrus.yaml")] = Path("."),
    home: HomeOption = None,
    host: HostOption = None,
    port: PortOption = None,
    admin_port: AdminPortOption = None,
    grpc_port: GrpcPortOption = None,
    require_keys: RequireKeysOption = None,
    insecure_no_auth: InsecureOption = False,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Serve a spec in the foreground (development mode) until Ctrl-C: the daemon `cirrus up` starts, on
    the same state directory and ports (so `cirrus get`, `predict`, `logs` ... work against it), with
    the spec deployed and a new revision rolled out on each edit of its directory (what .cirrusignore
    leaves out excepted). An edit that breaks the spec or the code is logged; the old revision serves on."""
    with _errors():
        more = {"require_keys": require_keys, "insecure_no_auth": insecure_no_auth or None, **_tls(tls_cert, tls_key)}
        settings = _settings(home, host, port, admin_port, grpc_port=grpc_port, **more)
        from cirrus.client import CirrusError
        from cirrus.daemon import DaemonError, serve_foreground

        try:
            serve_foreground(settings, str(path))
        except DaemonError as exc:
            raise CirrusError(str(exc)) from None


@app.command()
def gateway(
    join: Annotated[
        str,
        typer.Option("--join", help="the daemon's admin API URL, e.g. http://10.0.0.1:8889", show_default=False),
    ],
    token: Annotated[
        str | None,
        typer.Option("--token", help="the daemon's admin token (others can read it in `ps`: prefer --token-file)"),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="a file holding the admin token ($CIRRUS_HOME/token there)")
    ] = None,
    host: HostOption = None,
    port: PortOption = None,
    grpc_port: GrpcPortOption = None,
    require_keys: RequireKeysOption = None,
    insecure_no_auth: InsecureOption = False,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Run one more gateway for a daemon's APIs, on any node, in the foreground until Ctrl-C.

    It serves the same APIs as the daemon's gateway, follows its route changes (deploys, rollouts,
    canaries, deletes, keys) and reports its load, which the daemon's autoscaler counts. The daemon's
    admin API must be reachable from here (`cirrus up --admin-host`), and so must its replicas."""
    with _errors():
        secret = _admin_token(token, token_file)
        more = {"require_keys": require_keys, "insecure_no_auth": insecure_no_auth or None, **_tls(tls_cert, tls_key)}
        settings = _settings(None, host, port, None, grpc_port=grpc_port, **more)
        from cirrus.client import CirrusError
        from cirrus.daemon import DaemonError, serve_joined

        try:
            serve_joined(settings, join, secret)
        except DaemonError as exc:
            raise CirrusError(str(exc)) from None


def _admin_token(token: str | None, token_file: Path | None) -> str:
    if (token is None) == (token_file is None):
        raise ValueError("give the daemon's admin token: --token-file FILE (or --token TOKEN), one of them")
    if token_file is not None:
        try:
            token = token_file.expanduser().read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
    if not token:
        raise ValueError("the admin token is empty")
    return token


# API keys.

keys_app = typer.Typer(help="API keys: who may call the APIs, and how often.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.add_typer(tasks_app, name="tasks")
app.add_typer(envs_app, name="envs")
app.add_typer(requests_app, name="requests")
_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_s(text: str) -> float:
    """`90s`, `30m`, `12h`, `7d` (or plain seconds) in seconds."""
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _DURATION else (text, "s")
    try:
        value = float(number) * _DURATION[unit]
    except ValueError:
        raise ValueError(f"--expires {text!r}: give a duration such as 90s, 30m, 12h or 7d") from None
    if value <= 0:
        raise ValueError(f"--expires {text!r}: the duration must be positive")
    return value


def _rate(text: str) -> float:
    """`10/s`, `600/m` or `10` in requests per second."""
    number, _, unit = text.partition("/")
    per = {"": 1, "s": 1, "m": 60, "h": 3600}.get(unit)
    try:
        value = float(number) / per if per else -1.0
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"--rate {text!r}: give requests per second (10, 10/s) or per minute (600/m)")
    return value


@keys_app.command("create")
def keys_create(
    api: Annotated[
        list[str] | None, typer.Option("--api", help="an API the key may call (repeat; default all)")
    ] = None,
    rate: Annotated[str | None, typer.Option(help="rate limit: 10, 10/s, 600/m (default none)")] = None,
    burst: Annotated[float | None, typer.Option(help="requests allowed at once above the rate")] = None,
    expires: Annotated[str | None, typer.Option(help="lifetime: 90s, 30m, 12h, 7d (default never)")] = None,
    name: Annotated[str | None, typer.Option(help="a label for people")] = None,
    home: HomeOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Create an API key and print it once (only its hash is kept)."""
    with _errors():
        key, record = _client(home).create_key(
            api, None if rate is None else _rate(rate), burst, None if expires is None else _duration_s(expires), name
        )
        if output is Output.json:
            _print_json({"key": key, **record.model_dump(mode="json")})
            return
        typer.echo(key)
        _stderr().print(f"key {record.id}: shown only now; send it as `Authorization: Bearer <key>` or `X-API-Key`")


@keys_app.command("list")
def keys_list(home: HomeOption = None, output: OutputOption = Output.table) -> None:
    """The keys (never the keys themselves): id, name, APIs, rate, expiry, revoked."""
    with _errors():
        found = _client(home).keys()
        if output is Output.json:
            _print_json([k.model_dump(mode="json") for k in found])
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for column in ("ID", "NAME", "APIS", "RATE/S", "BURST", "EXPIRES", "REVOKED"):
            table.add_column(column)

        def when(at: float | None) -> str:
            return "-" if at is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(at))

        for k in found:
            apis = ",".join(k.apis) if k.apis else "all"
            rate = "-" if k.rate is None else f"{k.rate:g}"
            burst = "-" if k.burst is None else f"{k.burst:g}"
            table.add_row(k.id, k.name or "-", apis, rate, burst, when(k.expires_at), when(k.revoked_at))
        _stdout().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (see `cirrus keys list`)")], home: HomeOption = None
) -> None:
    """Revoke a key: the gateway refuses it from now on."""
    with _errors():
        record = _client(home).revoke_key(key_id)
        typer.echo(f"key {record.id} revoked")


def _read_payload(argument: str) -> tuple[Any, dict[str, str]]:
    """`@file`/`@-` -> (bytes, content type guessed); anything else must be JSON text -> (object, {})."""
    if not argument.startswith("@"):
        try:
            return json.loads(argument), {}
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"the payload is not valid JSON ({exc}); pass JSON text, or @FILE to send a file as is"
            ) from None
    source = argument[1:]
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the payload file {source!r}: {exc.strerror}") from None
    try:
        json.loads(data)
        content_type = "application/json"
    except ValueError:
        content_type = mimetypes.guess_type(source)[0] or "application/octet-stream"
    return data, {"content-type": content_type}


def _parse_headers(values: list[str]) -> dict[str, str]:
    headers = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header {value!r} must look like 'Name: value'")
        headers[name.strip()] = content.strip()
    return headers


if __name__ == "__main__":
    main()
