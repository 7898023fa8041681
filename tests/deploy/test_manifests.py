"""deploy/ parsed and checked: required fields, pinned versions, and commands our CLI accepts."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load(rel: str) -> dict:
    docs = list(yaml.safe_load_all((DEPLOY / rel).read_text()))
    assert len(docs) == 1, rel
    return docs[0]


def cli(argv: list[str]):
    """What our own CLI makes of a command line in a manifest (argparse exits on anything unknown)."""
    assert argv[0] == "prunesearch" or argv[0].endswith("/prunesearch"), argv
    return _parser().parse_args(argv[1:])


def pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.split(r"==", d)[1] for d in deps if re.split(r"[\[=]", d)[0] == package)


def test_the_raycluster_has_trainers_a_target_group_and_a_private_head():
    rc = load("kuberay/raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert rc["spec"]["rayVersion"] == pin("ray")
    head = rc["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    trainers = groups["gpu-trainers"]
    assert '\\"trainer\\": 1' in trainers["rayStartParams"]["resources"]
    assert (
        trainers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == "1"
    )
    target = groups["target-t4"]
    assert (
        target["rayStartParams"]["labels"] == "hw=t4"
        and "trainer" not in target["rayStartParams"]["resources"]
    )
    # Credentials come from Secrets, never literal values (the one literal says which auth mode).
    env = head["template"]["spec"]["containers"][0]["env"]
    assert env and all(
        "valueFrom" in e and "value" not in e for e in env if e["name"] != "RAY_AUTH_MODE"
    )


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _has_ray_token(container: dict) -> bool:
    env = _env(container)
    return (
        env.get("RAY_AUTH_MODE", {}).get("value") == "token"
        and env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("name")
        == "prunesearch-ray-token"
    )


def test_the_ray_dashboard_is_on_localhost_or_behind_token_auth_and_the_files_say_so():
    # KubeRay: the head is a ClusterIP Service only, and every Ray container runs with token auth
    # (the dashboard/Jobs API refuses requests without the token); every submitter carries it.
    rc = load("kuberay/raycluster.yaml")
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    pods = [rc["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in rc["spec"]["workerGroupSpecs"]
    ]
    containers = [c for pod in pods for c in pod["spec"]["containers"]]
    assert len(containers) == 3 and all(_has_ray_token(c) for c in containers)
    submitters = [
        load("kuberay/rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"][0],
        load("kuberay/cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
            "containers"
        ][0],
        load("kuberay/raycronjob.yaml")["spec"]["jobTemplate"]["submitterPodTemplate"]["spec"][
            "containers"
        ][0],
    ]
    assert all(_has_ray_token(c) for c in submitters)
    text = (DEPLOY / "kuberay/raycluster.yaml").read_text()
    assert "token auth" in text and "kubectl create secret generic prunesearch-ray-token" in text
    # Bare machines: the head's dashboard listens on localhost only, and the script says so.
    script = (DEPLOY / "vm/ray-start.sh").read_text()
    head = next(ln for ln in script.splitlines() if ln.strip().startswith("head)"))
    assert "--dashboard-host=127.0.0.1" in head and "localhost only" in script
    # Nothing binds the dashboard to every interface outside a pod behind a ClusterIP Service.
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "raycluster.yaml":
            assert (
                "dashboard-host=0.0.0.0" not in path.read_text()
                and 'dashboard-host: "0.0.0.0"' not in path.read_text()
            )


def test_jobs_and_schedules_run_commands_the_cli_accepts():
    job = load("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"] == {
        "ray.io/cluster": "prunesearch"
    }
    assert cli(shlex.split(job["spec"]["entrypoint"])).command == "run"

    cron = load("kuberay/cronjob.yaml")
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    args = cli(["prunesearch", *container["args"]])  # the image's ENTRYPOINT is prunesearch
    assert (
        args.command == "submit" and args.nightly and args.wait and args.address.endswith(":8265")
    )

    raycron = load("kuberay/raycronjob.yaml")
    assert raycron["kind"] == "RayCronJob" and raycron["spec"]["schedule"]
    assert cli(shlex.split(raycron["spec"]["jobTemplate"]["entrypoint"])).command == "nightly"
    assert "--feature-gates=RayCronJob=true" in (DEPLOY / "kuberay/raycronjob.yaml").read_text()

    service = (DEPLOY / "vm/prunesearch-nightly.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", service, re.M).group(1)
    assert cli(shlex.split(exec_start)).command == "nightly"
    line = next(
        ln
        for ln in (DEPLOY / "vm/crontab").read_text().splitlines()
        if ln and not ln.startswith("#")
    )
    command = shlex.split(line.split("&& ", 1)[1])
    assert cli(command[command.index(".venv/bin/prunesearch") :][:3]).command == "nightly"


def test_the_image_is_pinned_like_pyproject_and_runs_the_cli():
    text = (DEPLOY / "docker/Dockerfile").read_text()
    assert f'"torch=={pin("torch")}"' in text and f'"torchvision=={pin("torchvision")}"' in text
    assert 'ENTRYPOINT ["prunesearch"]' in text and "USER 1000" in text
    images = set(
        re.findall(r"image:\s*(\S+)", "".join(p.read_text() for p in DEPLOY.glob("kuberay/*.yaml")))
    )
    assert images == {"ghcr.io/example/prunesearch:cpu", "ghcr.io/example/prunesearch:cuda"}


def test_mlflow_and_postgres_listen_on_localhost_and_mlflow_needs_a_login():
    compose = load("mlflow/docker-compose.yaml")
    for name, service in compose["services"].items():
        assert all(p.startswith("127.0.0.1:") for p in service["ports"]), name
    assert "--app-name basic-auth" in compose["services"]["mlflow"]["command"]
    # ...and the file says so; its passwords come from the environment, never the file.
    text = (DEPLOY / "mlflow/docker-compose.yaml").read_text()
    assert "bind to 127.0.0.1 only" in text
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith(
        "${"
    )
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    assert "CREATE DATABASE optuna" in (DEPLOY / "mlflow/init-optuna.sql").read_text()


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*") if p.is_file())
)
def test_every_deploy_file_is_referenced_from_the_readme(path):
    assert f"`{path}`" in (ROOT / "README.md").read_text()
