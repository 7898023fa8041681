"""A node removed from a simulated multi-node cluster mid-trial: its trials are retried elsewhere.

A head (the driver, the latency bench) and two trainer nodes, on ``ray.cluster_utils.Cluster``.
When a trial is finetuning on the first trainer, that node is removed (its processes killed, as
a machine lost). Ray re-runs the trial on the other trainer; the search completes with every
trial accounted for. The same cluster also shows `prunesearch run` refusing a local SQLite
store on a multi-node cluster. It needs its own Ray cluster, so it runs in a subprocess and
leaves the session's shared cluster alone (as tests/orchestrator/test_routing.py does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import contextlib, io, json, os, sys, tempfile, threading, time
from pathlib import Path
import optuna, ray, yaml
from ray.cluster_utils import Cluster
sys.path.insert(0, os.environ["ROOT"])
from tests.e2e.helpers import quick_config
from tests.reliability.helpers import NO_EARLY_RULES
from orchestrator import prepare, run_search
from orchestrator.cli import main

fast_failure_detection = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                          "health_check_initial_delay_ms": 0}
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "resources": {"bench": 1}, "_system_config": fast_failure_detection})
doomed = cluster.add_node(num_cpus=1, resources={"trainer": 1})
spare = cluster.add_node(num_cpus=1, resources={"trainer": 1})
ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"PYTHONPATH": os.environ["ROOT"],
                                   "PRUNESEARCH_CACHE": os.environ["PRUNESEARCH_CACHE"]}})
tmp = Path(tempfile.mkdtemp())
events = tmp / "events.txt"
config = quick_config(tmp, name="node-loss", task="tests.reliability.faulty_task:build",
                      task_options={"counter": str(events), "count_batches": True},
                      search__trials=3, search__concurrency=2, search__early_stop=NO_EARLY_RULES,
                      finetune__epochs=2, target__resources={"bench": 1}, resources__custom={"trainer": 1})
out = {"doomed": doomed.node_id, "spare": spare.node_id}

# 1. `prunesearch run` refuses a local SQLite store on this multi-node cluster, before any trial.
path = tmp / "search.yaml"
path.write_text(yaml.safe_dump(config.to_dict()))
err = io.StringIO()
with contextlib.redirect_stderr(err):
    out["cli_code"] = main(["run", str(path)])
out["cli_err"] = err.getvalue()
out["cli_trials"] = sum(s.n_trials for s in optuna.get_all_study_summaries(storage=config.storage))

# 2. The search, with the doomed node removed while a trial finetunes on it.
based = threading.Event()
removed = {}

def lines():
    return [ln.split() for ln in events.read_text().splitlines()] if events.exists() else []

def remove_when_busy():
    based.wait(120)
    seen = len(lines())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        on_doomed = [ln for ln in lines()[seen:] if ln[1] == doomed.node_id and ln[3] == "batch"]
        if len(on_doomed) >= 6:  # a trial is finetuning there
            removed["tasks"] = sorted({ln[2] for ln in on_doomed})
            removed["at"] = time.monotonic()
            cluster.remove_node(doomed, allow_graceful=False)
            return
        time.sleep(0.05)

def progress(line):
    if line.startswith("base model"):
        based.set()

watcher = threading.Thread(target=remove_when_busy, daemon=True)
watcher.start()
t0 = time.monotonic()
outcome = run_search(prepare(config), progress=progress)
watcher.join(5)
study = optuna.load_study(study_name=config.name, storage=config.storage)
rows = lines()
out.update(
    removed_tasks=removed.get("tasks", []),
    seconds=time.monotonic() - t0,
    states=[(t.number, t.state.name, t.user_attrs.get("reason")) for t in study.trials],
    result_nodes=[r.node for r in outcome.results],
    counts=outcome.counts,
    task_nodes={task: sorted({ln[1] for ln in rows if ln[2] == task}) for task in removed.get("tasks", [])},
)
ray.shutdown(); cluster.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_a_removed_node_s_trials_are_retried_elsewhere_and_the_search_completes(tmp_path, ledger):
    # The task (tests.reliability.faulty_task) resolves from PYTHONPATH, as a user's would: a
    # config's module:function is looked up only in trusted roots, not wherever sys.path points.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "ROOT": str(ROOT), "PYTHONPATH": path}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        cwd=tmp_path,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        pytest.fail(f"node-loss script failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    got = json.loads(line[len("RESULT ") :])

    # The multi-node cluster refuses a local SQLite store through the CLI, before any trial.
    ledger.bad_input()
    assert got["cli_code"] == 2 and got["cli_trials"] == 0, got
    said = [ln for ln in got["cli_err"].splitlines() if ln.strip()]
    err = [ln for ln in said if ln.startswith("prunesearch:")]  # progress lines may precede it
    assert (
        len(err) == 1
        and said[-1] == err[0]
        and err[0].startswith("prunesearch: error: storage: ")
        and "--allow-local-storage" in err[0]
    )
    assert "3 nodes" in err[0], err

    # The node went away mid-trial; what ran there ran again on the spare node, and finished.
    assert got["removed_tasks"], "no trial was running on the doomed node when it was removed"
    ledger.fault("node removed")
    for task, nodes in got["task_nodes"].items():
        assert nodes == sorted([got["doomed"], got["spare"]]), (task, nodes)  # retried elsewhere
    assert [s for _, s, _ in got["states"]] == ["COMPLETE"] * 3, got["states"]
    assert len(got["result_nodes"]) == 3 and set(got["result_nodes"]) <= {
        got["doomed"],
        got["spare"],
    }
    assert (
        got["result_nodes"].count(got["doomed"]) < 3
    )  # not everything finished before the removal
    assert sum(got["counts"].values()) == 3, got["counts"]  # no trial counted twice
    ledger.lost(3 - len(got["result_nodes"]))
    ledger.check(9)
