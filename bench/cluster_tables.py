"""What bench/cluster.py prints and checks: its tables, its targets, and a summary with PASS/MISS."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import report

TARGET_RAY_OVER_LOCAL = 0.8  # no-op req/s, Cirrus on Ray (replica on another node) / Cirrus local
TARGET_OVER_SERVE = 10.0  # no-op req/s, Cirrus on Ray / Ray Serve on the same cluster
TARGET_WARM_SCALE_S = 2.0  # MiniLM, scale request -> the added replica ready, on a node with the template


@dataclass(frozen=True)
class Targets:
    ray_over_local_rps: float = TARGET_RAY_OVER_LOCAL
    ray_over_serve_rps: float = TARGET_OVER_SERVE
    minilm_warm_scale_s: float = TARGET_WARM_SCALE_S


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def find(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("name") == name and "rps" in r), None)


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    rows = results.get("noop", [])
    ray, local = find(rows, "ray"), find(rows, "local")
    if ray and local:
        found["ray_over_local_rps"] = report.at_least(ray["rps"] / local["rps"], TARGET_RAY_OVER_LOCAL)
    for row in rows:
        if ray and row.get("name", "").startswith("serve") and "rps" in row:
            found[f"ray_over_{row['name']}_rps"] = report.at_least(ray["rps"] / row["rps"], TARGET_OVER_SERVE)
    warm = [s["ready_s"] for s in results.get("minilm", []) if s["kind"] == "warm"]
    if warm:
        found["minilm_warm_scale_s"] = report.at_most(max(warm), TARGET_WARM_SCALE_S, note=" s")
    return found


def summary(results: dict[str, Any], found: dict[str, dict[str, Any]]) -> list[str]:
    """Every headline figure, with its target and PASS/MISS where it has one."""
    lines = ["### Summary", "", "| measure | value | target | result |", "|---|---|---|---|"]

    def target(key: str, name: str) -> None:
        if key in found:
            item = found[key]
            lines.append(f"| {name} | {item['value']} | {item['target']} | {'PASS' if item['met'] else 'MISS'} |")

    target("ray_over_local_rps", "no-op req/s: Cirrus on Ray / Cirrus local")
    for row in results.get("noop", []):
        if row["name"].startswith("serve"):
            target(f"ray_over_{row['name']}_rps", f"no-op req/s: Cirrus on Ray / {row['label']}")
    scale = results.get("scale")
    if scale:
        lines.append(f"| load step -> 2 ready on 2 nodes, s | {fmt(scale['ready_2_nodes_s'])} | - | - |")
    minilm = results.get("minilm", [])
    fresh = [s["ready_s"] for s in minilm if s["kind"] == "fresh"]
    if fresh:
        lines.append(f"| MiniLM scale-up, fresh node, s | {fmt(fresh[0])} | - | - |")
    target("minilm_warm_scale_s", "MiniLM scale-up, warm node (slowest), s")
    death = results.get("death")
    if death:
        lines.append(f"| node killed -> Ray says dead, s | {fmt(death['ray_dead_s'])} | - | - |")
        lines.append(f"| node killed -> replacement ready, s | {fmt(death['replacement_ready_s'])} | - | - |")
    return lines


def start_text(start: dict[str, Any] | None) -> str:
    """How a replica started, from its node's logs: forked or fresh, the template's import when it was
    started for this replica, the predictor's load."""
    if not start:
        return "-"
    parts = [start["mode"]]
    if start.get("template_import_s") is not None:
        parts.append(f"template imports {start['template_import_s']:.2f}")
    if start.get("load_s") is not None:
        parts.append(f"load {start['load_s']:.2f}")
    return ", ".join(parts)


def header(results: dict[str, Any]) -> list[str]:
    start = results.get("cluster", {})
    return [
        f"Cluster: head (0 CPUs) + worker nodes in network namespaces, up in {fmt(start.get('cluster_up_s'))} s; "
        f"the Ray daemon up in {fmt(start.get('ray_daemon_up_s'))} s. Machine: {os.cpu_count()} CPUs, load average "
        f"{start.get('loadavg_at_start')} at the start, {results.get('loadavg_at_end')} at the end. Idle, the "
        f"cluster and the Ray daemon used {fmt(start.get('idle_cluster_cpu_pct'), 0)} % of a core and other "
        f'processes {fmt(start.get("idle_other_cpu_pct"), 0)} %. "Other CPU": % of one core used over each '
        "measurement by processes not of this run (realtime.py's measure; above ~25 %, figures are not clean).",
        "",
    ]


def noop_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "### No-op through the gateway (wrk -t1 -c16, after a warm-up)",
        "",
        "| server | replica on | req/s | p50 ms | p99 ms | non-2xx / socket errors | run's CPU % | other CPU % "
        "| deploy -> first 200 s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r['where']} | {r['rps']:.0f} | {report.fmt_ms(r.get('p50_ms'))} "
            f"| {report.fmt_ms(r.get('p99_ms'))} | {r['non2xx']} / {r['socket_errors']} "
            f"| {r['server_cpu_pct']:.0f} | {r['other_cpu_pct']:.0f} | {fmt(r['ready_s'])} |"
        )
    return [*lines, "", "Run's CPU: every process of the run (daemons, replicas, the whole Ray cluster) but wrk.", ""]


def scale_table(scale: dict[str, Any]) -> list[str]:
    before, after = scale["before"], scale["after"] or {}
    return [
        "### Load step: a second replica on another node (sleep50, target_concurrency 1, 1-2 replicas; s from the "
        "load's start)",
        "",
        "| clients | desired 2 | 2 ready on 2 nodes | new replica on | agent there before | start (s) "
        "| req/s before / after | p50 ms before / after | other CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {scale['clients']} | {fmt(scale['desired_2_s'])} | {fmt(scale['ready_2_nodes_s'])} "
        f"| {fmt(scale['new_node'])} | {fmt(scale['new_node_had_agent'])} | {start_text(scale['start'])} "
        f"| {fmt(before.get('rps'), 1)} / {fmt(after.get('rps'), 1)} "
        f"| {fmt(before.get('p50_ms'), 1)} / {fmt(after.get('p50_ms'), 1)} | {scale['other_cpu_pct']:.0f} |",
        "",
    ]


def minilm_table(steps: list[dict[str, Any]]) -> list[str]:
    lines = [
        "### MiniLM: scale 1 -> 2 by a deploy that changes only the bounds (s from the deploy call)",
        "",
        "| node | agent there before | revision ran there | action | placed | ready | start (s) | other CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s['kind']}: {s['node']} | {fmt(s['node_had_agent'])} | {fmt(s['node_ran_revision'])} "
            f"| {s['action']} | {fmt(s['placed_s'])} | {s['ready_s']:.2f} | {start_text(s['start'])} "
            f"| {s['other_cpu_pct']:.0f} |"
        )
    return [*lines, ""]


def death_table(death: dict[str, Any], health: dict[str, int]) -> list[str]:
    return [
        "### A node killed (s from the kill)",
        "",
        f"Ray's health check as tests/netns_cluster.py sets it: every {health['period_ms']} ms, a node dead after "
        f"{health['failure_threshold']} failures of {health['timeout_ms']} ms (Ray's defaults take ~12 s here). "
        '"Ray says dead": a driver polling `ray.nodes()` every 0.1 s (`NetnsCluster.wait_dead`), started '
        f"{death['watch_lead_s']:g} s before the kill.",
        "",
        "| node killed | Ray says dead | Cirrus drops the replica | replacement placed | replacement ready "
        "| first 200 | replacement on | start (s) | other CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {death['victim']} ({death['processes_killed']} processes) | {fmt(death['ray_dead_s'])} "
        f"| {fmt(death['cirrus_dropped_s'])} | {fmt(death['replacement_placed_s'])} "
        f"| {fmt(death['replacement_ready_s'])} | {fmt(death['first_200_s'])} | {death['replacement_node']} "
        f"| {start_text(death['start'])} | {death['other_cpu_pct']:.0f} |",
        "",
    ]


def markdown(results: dict[str, Any], found: dict[str, dict[str, Any]]) -> str:
    lines = header(results)
    if results.get("noop"):
        lines += noop_table(results["noop"])
    if results.get("scale"):
        lines += scale_table(results["scale"])
    if results.get("minilm"):
        lines += minilm_table(results["minilm"])
    if results.get("death"):
        lines += death_table(results["death"], results["cluster"]["health_check"])
    return "\n".join(lines + summary(results, found))
