"""Routing on a simulated multi-node cluster: measurements on the target node, training elsewhere.

It needs its own multi-node Ray cluster, so it runs in a subprocess and leaves the session's
shared cluster alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, sys, tempfile
import optuna, ray
from ray.cluster_utils import Cluster
sys.path.insert(0, os.environ["ROOT"])
from tests.e2e.helpers import quick_config
from orchestrator import prepare, run_search

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"trainer": 2}})
edge = cluster.add_node(num_cpus=1, resources={"edge_cpu": 1}, labels={"hw": "edge"})
ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"PYTHONPATH": os.environ["ROOT"],
                                   "PRUNESEARCH_CACHE": os.environ["PRUNESEARCH_CACHE"]}})
tmp = tempfile.mkdtemp()
config = quick_config(__import__("pathlib").Path(tmp), name="routing", search__trials=3,
                      target__name="edge", target__label_selector={"hw": "edge"},
                      target__resources={"edge_cpu": 1}, resources__custom={"trainer": 1})
outcome = run_search(prepare(config), progress=lambda line: None)
nodes = {"head": cluster.head_node.node_id, "edge": edge.node_id,
         "trials": [r.node for r in outcome.results],
         "latency": [r.latency.node for r in outcome.results if r.latency]}
ray.shutdown(); cluster.shutdown()
print("RESULT " + json.dumps(nodes))
"""


def test_measurements_run_on_the_target_node_and_training_elsewhere(tmp_path):
    import os

    env = {**os.environ, "ROOT": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=400
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        pytest.fail(f"routing script failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    nodes = json.loads(line[len("RESULT ") :])
    assert len(nodes["trials"]) == 3
    assert set(nodes["trials"]) == {nodes["head"]}, "training must stay off the target node"
    assert nodes["latency"] and set(nodes["latency"]) <= {nodes["edge"]}, (
        "every measurement ran on the target"
    )
