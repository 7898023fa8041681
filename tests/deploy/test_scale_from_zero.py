"""A KubeRay cluster whose trainer group autoscales from zero: the search must not refuse to start
because no trainer node is up yet, when the autoscaler has reported a node group that has one."""

from __future__ import annotations

import pytest
import ray
from ray.core.generated import autoscaler_pb2

from orchestrator import check_placeable


def _config(*groups: tuple[str, dict[str, float], int]) -> autoscaler_pb2.ClusterConfig:
    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in groups:
        group = config.node_group_configs.add(name=name, max_count=max_count)
        group.resources.update(resources)
    return config


@pytest.fixture
def head_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster as it is right after apply: only the head (no CPUs for trials) is alive."""
    head = {"Alive": True, "Resources": {"memory": 1e9}, "Labels": {}}
    monkeypatch.setattr(ray, "nodes", lambda: [head])


def _report(monkeypatch: pytest.MonkeyPatch, config: autoscaler_pb2.ClusterConfig | None) -> None:
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)


def test_a_group_the_autoscaler_can_start_is_placeable(head_only, monkeypatch):
    _report(monkeypatch, _config(("trainers", {"CPU": 4, "trainer": 1}, 8)))
    check_placeable("resources", {"trainer": 1}, {}, resource_key="custom")


@pytest.mark.parametrize(
    "config",
    [
        None,  # no autoscaler (a `ray start` cluster): only alive nodes count
        _config(("trainers", {"CPU": 4, "trainer": 1}, 0)),  # a group that may never start
        _config(("targets", {"CPU": 4, "target_t4": 1}, 2)),  # no group has the resource
    ],
    ids=["no-autoscaler", "max-zero", "other-resource"],
)
def test_without_such_a_group_it_is_still_refused(head_only, monkeypatch, config):
    _report(monkeypatch, config)
    with pytest.raises(ValueError, match="no node of the Ray cluster"):
        check_placeable("resources", {"trainer": 1}, {}, resource_key="custom")


def test_an_unreadable_autoscaler_state_counts_as_none(head_only, monkeypatch):
    def broken() -> None:
        raise RuntimeError("GCS has no such key")

    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", broken)
    with pytest.raises(ValueError, match="no node of the Ray cluster"):
        check_placeable("resources", {"trainer": 1}, {}, resource_key="custom")
