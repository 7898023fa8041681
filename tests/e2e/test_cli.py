"""The CLI: bad input is refused before any cluster work, with one clear line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import yaml

from orchestrator.cli import format_table, main, plural
from workers import TrialStatus

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# Bad input (one line naming the field and the fix, exit 2, no traceback, --debug) is a table in
# tests/reliability/test_bad_input.py.


def test_run_refuses_bad_config_before_ray_starts(tmp_path):
    # A subprocess, so "Ray never started" is observable: no session directory is created.
    env_tmp = tmp_path / "raytmp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "run",
            write(tmp_path, {"name": "x", "search": {"trails": 1}}),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "RAY_TMPDIR": str(env_tmp)},
        timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean 'trials'" in proc.stderr
    assert not env_tmp.exists()


def test_check_reports_groups_and_what_was_left_out(tmp_path, capsys):
    assert main(["check", write(tmp_path, {"name": "x"})]) == 0
    out = capsys.readouterr().out
    assert "config ok: x; 9 prunable groups" in out
    assert "left out fc: output layer" in out


def test_check_lists_every_group_and_says_so_as_json(tmp_path, capsys):
    config = write(tmp_path, {"name": "x"})
    assert main(["check", config, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == "x" and len(report["groups"]) == 9
    assert all(g["channels"] > 0 and g["name"] in g["members"] for g in report["groups"])
    assert report["excluded"] == [{"name": "fc", "reason": report["excluded"][0]["reason"]}]
    assert main(["check", config]) == 0
    out = capsys.readouterr().out
    assert all(f"  {g['name']} " in out for g in report["groups"])  # each group on its own row
    assert "channels" in out and "members" in out


def test_check_names_the_residual_blocks_and_whether_a_plan_may_drop_them(tmp_path, capsys):
    config = write(tmp_path, {"name": "x"})
    assert main(["check", config, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the digits CNN's identity-shortcut blocks; layer2.0 and layer3.0 downsample (no x + f(x))
    assert [b["name"] for b in report["blocks"]] == ["layer1.0", "layer1.1", "layer2.1"]
    assert report["blocks"][0]["groups"] == ["layer1.0.conv1"]
    assert "a plan may drop them whole (search.space.depth: null, the default)" in report["depth"]
    assert main(["check", config, "--set", "search.space.depth=0"]) == 0
    assert "none dropped (search.space.depth: 0: channels only" in capsys.readouterr().out
    assert main(["check", config]) == 0
    out = capsys.readouterr().out
    assert "residual blocks: 3; a plan may drop them whole (search.space.depth: null" in out
    assert "residual block layer2.1 (1 group inside)" in out
    assert main(["check", config, "--set", "search.space.depth=2"]) == 0
    assert "a plan may drop at most 2 of them whole" in capsys.readouterr().out
    assert main(["check", config, "--set", "search.space.granularity=layer", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["blocks"] == [] and "needs search.space.granularity: allocation" in report["depth"]
    )


def test_table_formatting():
    rows = [
        {
            "trial": 3,
            "accuracy": 0.98,
            "latency_ms": 0.4,
            "speedup": 1.5,
            "macs": 2_000_000,
            "params": 1500,
            "criterion": "l1",
        }
    ]
    text = format_table(rows)
    assert "2.00M" in text and "1.5k" in text and "1.50x" in text
    assert "0.9800" in text and "0.400" in text  # one precision per column, whatever the value
    assert plural(1, "model") == "1 model" and plural(4, "model") == "4 models"
    assert format_table([]) == "(no feasible trials yet)"
    json.dumps(rows)


def test_a_user_task_module_runs_through_ray_workers(tmp_path, ray_cluster):
    """examples/my_task.py is the documented seam: it must import and run on Ray workers."""
    import optuna

    from orchestrator import load_config, prepare, run_search

    config = load_config(
        ROOT / "examples" / "custom.yaml",
        [
            "search.trials=2",
            "finetune.epochs=1",
            f"storage=sqlite:///{tmp_path}/o.db",
            f"tracking.uri=sqlite:///{tmp_path}/m.db",
            "task_options.epochs=1",
        ],
    )
    outcome = run_search(prepare(config), progress=lambda line: None)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    # The second pick may be rejected unfinetuned: this task's base model is perfect, so the first
    # finetuned pick can already dominate it (search.early_stop.reject_dominated).
    statuses = [t.user_attrs["status"] for t in study.trials]
    assert statuses[0] == TrialStatus.COMPLETE and statuses[1] in (
        TrialStatus.COMPLETE,
        TrialStatus.REJECTED,
    ), statuses
    assert outcome.base["accuracy"] > 0.25  # above chance on 4 classes


def test_our_lines_are_printed_once_even_after_a_library_configures_the_root_logger(
    tmp_path, capsys
):
    """Registration's ONNX export calls ``logging.basicConfig``: from then on every progress
    line came out twice, the second prefixed ``INFO:prunesearch.progress:``."""
    assert main(["run", write(tmp_path, {"name": "x", "search": {"trails": 1}})]) == 2
    capsys.readouterr()
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=logging.INFO, force=True)  # what such a library does
    try:
        logging.getLogger("prunesearch.progress").info("registering m: 1/1")
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = before
    assert err.count("registering m: 1/1") == 1 and "INFO:prunesearch" not in err


def test_an_error_raised_on_a_ray_worker_is_reported_as_its_own_one_line(
    tmp_path, ray_cluster, capsys
):
    """Ray wraps a task's or actor's error in its remote traceback, coloured for a terminal;
    the line says the error itself (here the model refuses the target's batch of 4)."""
    config = tmp_path / "one.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "one",
                "task": "tests.workers.odd_models:one_at_a_time",
                "target": {"batch_size": 4},
                "storage": f"sqlite:///{tmp_path}/o.db",
                "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"},
            }
        )
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "prunesearch: error: this model takes one sample at a time, not 4", err
