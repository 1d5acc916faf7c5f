"""Ray Serve's no-op on a namespace Ray cluster, for bench/cluster.py.

Run as a script, this is a Ray driver (RAY_ADDRESS from the environment) that starts Serve with its
HTTP proxy on the head only, at HOST:PORT, then reads one JSON command a line from stdin:
``{"deploy": N}`` runs the no-op deployment of ../shared/peers/servers/ray_app.py at route
``/predict``, one replica holding one unit of RESOURCE (so that it lands on a worker node), with
``max_ongoing_requests`` N (null: Serve's default); anything else shuts Serve down and ends. It
answers each command, and the start, with one JSON line.

    python bench/serve_noop.py HOST PORT RESOURCE

`ServeDriver` is the benchmark's side: it runs the script in the cluster's root namespace and talks
to it. Ray is imported only by the script, and it needs Ray Serve (``pip install 'ray[serve]==2.60.0'``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import procs

SCRIPT = Path(__file__).resolve()
DEFAULT_LABEL = "Ray Serve, defaults (max_ongoing_requests 5)"


class ServeDriver:
    """The driver script, started in the cluster's root namespace (`NetnsCluster.run_in`)."""

    def __init__(self, cluster: Any, nodes: list[Any], resource: str, log_path: Path) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self.resource = resource
        self.port = procs.free_port()
        self.url = f"http://{cluster.head_ip}:{self.port}/predict"
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float) -> str | None:
        """Start Serve (controller and proxy on the head); None, or why Ray Serve cannot run here."""
        with self.log_path.open("w") as log_file:
            argv = [sys.executable, str(SCRIPT), self.cluster.head_ip, str(self.port), self.resource]
            self.proc = self.cluster.run_in(
                None, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True
            )
        error: str | None = self.ask(None, timeout).get("error")
        return error

    def deploy(self, max_ongoing: int | None, timeout: float) -> None:
        self.ask({"deploy": max_ongoing}, timeout)

    def ask(self, command: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """Send `command` (None: nothing), then the script's next line; BenchError when none comes in time."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else ""
        if not line:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise procs.BenchError(f"the Ray Serve driver did not answer within {timeout:g} s:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def replica_node(self) -> str:
        """The worker node whose namespace runs the Serve replica (Ray titles its process ServeReplica:...)."""
        for node in self.nodes:
            if any("ServeReplica" in procs.cmdline(pid, 200) for pid in node.pids()):
                return str(node.name)
        return "?"

    def stop(self) -> None:
        """`serve.shutdown()` and the driver's end; what is left, the cluster's close kills."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError, ValueError, procs.BenchError):
            self.ask({}, 60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)


def driver(host: str, port: int, resource: str) -> None:
    try:
        import ray
        from ray import serve
        from starlette.requests import Request
    except ImportError as exc:
        print(json.dumps({"error": f"{exc} (pip install 'ray[serve]==2.60.0')"}), flush=True)
        return

    class Noop:  # ../shared/peers/servers/ray_app.py's no-op
        async def __call__(self, request: Request) -> dict[str, Any]:
            d = await request.json()
            return {"y": d["x"]}

    deployment: Any = serve.deployment(Noop)
    ray.init(logging_level=logging.ERROR, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    print(json.dumps({"started": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if "deploy" not in command:
            break
        options: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0, "resources": {resource: 1}}}
        if command["deploy"]:
            options["max_ongoing_requests"] = command["deploy"]
        serve.run(deployment.options(**options).bind(), route_prefix="/predict")
        print(json.dumps({"deployed": True}), flush=True)
    serve.shutdown()
    print(json.dumps({"stopped": True}), flush=True)


if __name__ == "__main__":
    driver(sys.argv[1], int(sys.argv[2]), sys.argv[3])
