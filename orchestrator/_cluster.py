"""Attach to (or start) the Ray cluster the search runs on."""

from __future__ import annotations

import os

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
             log_to_driver=True)
