"""Attach to (or start) the Ray cluster the search runs on."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ray


def ensure_ray(address: str | None = None) -> None:
    """Reuse a connected Ray; else attach to ``address`` / RAY_ADDRESS; else start a local one."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, log_to_driver=True)
        return
    # A local cluster: workers must import a user's task module from where the CLI runs.
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    # address="local": always a fresh local instance, never a stale or unrelated one that
    # /tmp/ray/ray_current_cluster points at (set ray_address: auto to join a `ray start` one).
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}},
             log_to_driver=True, _system_config=LOCAL_SYSTEM_CONFIG)


# Ray keeps about one idle worker process per CPU and kills the rest after a second idle; the
# latency bench and the front board take two of those slots, so a finished trial's warm worker
# (torch imported, task built: ~5 s) was killed and the next trial paid for a new one. Measured on
# the digits search (2 CPUs, 5 trials): 56 s -> 35 s cold, 23 s warm.
LOCAL_SYSTEM_CONFIG = {"num_workers_soft_limit": (os.cpu_count() or 1) + 4}


def check_placeable(section: str, resources: Mapping[str, float], labels: Mapping[str, str], *,
                    resource_key: str = "resources", who: str = "") -> None:
    """Refuse, before any work, a target or trial that no node of the cluster could ever run.

    ``section`` is the config section (``target`` or ``resources``), so the error names what to fix.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(_fits(n, resources, labels) for n in nodes):
        return
    flags = []
    if resources:
        flags.append(f"--resources='{json.dumps(dict(resources))}'")
    if labels:
        flags.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    raise ValueError(
        f"{section}{who}: no node of the Ray cluster has resources {dict(resources)} and labels {dict(labels)} "
        f"({len(nodes)} node(s) alive); start one with `ray start --address=HEAD:6379 {' '.join(flags)}`, "
        f"or fix {section}.{resource_key} / {section}.label_selector"
    )


def _fits(node: Mapping[str, Any], resources: Mapping[str, float], labels: Mapping[str, str]) -> bool:
    have = node.get("Resources") or {}
    node_labels = node.get("Labels") or {}
    return all(have.get(k, 0) >= v for k, v in resources.items()) and all(
        _label_matches(node_labels.get(k), v) for k, v in labels.items())


def _label_matches(value: str | None, selector: str) -> bool:
    """Ray's label-selector values: ``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``."""
    negate = selector.startswith("!")
    body = selector[1:] if negate else selector
    if body.startswith("in(") and body.endswith(")"):
        hit = value in {s.strip() for s in body[3:-1].split(",")}
    else:
        hit = value == body
    return hit != negate


def check_room_for_trials(num_cpus: float, bench_cpus: float) -> None:
    """On a one-node cluster, the latency benches' reserved CPUs must leave room for a trial,
    or the search would wait forever for a worker."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = sum((n.get("Resources") or {}).get("CPU", 0.0) for n in nodes)
    if len(nodes) == 1 and total - bench_cpus < num_cpus:
        raise ValueError(
            f"resources.num_cpus: a trial asks for {num_cpus:g} CPU(s), but this one-node cluster has {total:g} "
            f"and timing reserves {bench_cpus:g} (target.threads); lower target.threads or resources.num_cpus, "
            "or add a node"
        )
