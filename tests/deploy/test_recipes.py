"""The README walks from an empty namespace to a nightly schedule with nothing left unwritten: every
Secret and ConfigMap the manifests read is created or made by a written step, every deploy file
is named, every path it names exists; the VM schedules run commands our CLI accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def readme_deploy() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Deploy\n") : text.index("## Tests\n")]


def _refs(node: object, kind: str) -> set[str]:
    """Names of Secrets (kind='secret') or ConfigMaps ('configMap') a manifest reads."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in (f"{kind}KeyRef", f"{kind}Ref") and isinstance(value, dict):
                found.add(value["name"])
            elif key == kind and isinstance(value, dict) and "name" in value:
                found.add(value["name"])  # volumes: configMap: {name: ...}
            elif key == "secretName" and kind == "secret" and isinstance(value, str):
                found.add(value)  # authOptions.secretName
            found |= _refs(value, kind)
    elif isinstance(node, list):
        for item in node:
            found |= _refs(item, kind)
    return found


def manifests() -> list[dict]:
    return [
        d
        for p in sorted((DEPLOY / "kuberay").rglob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]


def test_every_secret_the_manifests_read_is_created_in_the_readme():
    secrets = set().union(*(_refs(m, "secret") for m in manifests()))
    assert secrets == {
        "prunesearch-ray-token",
        "prunesearch-redis",
        "prunesearch-mlflow",
        "prunesearch-postgres",
    }
    text = readme_deploy()
    for name in secrets:
        assert f"kubectl -n prunesearch create secret generic {name} " in text, name


def test_every_configmap_the_manifests_read_is_generated_from_a_written_file():
    maps = set().union(*(_refs(m, "configMap") for m in manifests()))
    assert maps == {"prunesearch-config"}
    base = yaml.safe_load((DEPLOY / "kuberay/base/kustomization.yaml").read_text())
    assert base["configMapGenerator"][0]["name"] == "prunesearch-config"
    for rel in ("base/search.yaml", "overlays/gpu/search.yaml"):
        assert (DEPLOY / "kuberay" / rel).is_file() and f"`deploy/kuberay/{rel}`" in readme_deploy()


def test_the_walkthrough_applies_in_order_and_names_only_files_that_exist():
    text = readme_deploy()
    steps = [
        "kubectl apply -f deploy/kuberay/namespace.yaml",
        "create secret generic prunesearch-ray-token",
        "kubectl apply -k deploy/kuberay/overlays/gpu",
        "kubectl -n prunesearch create -f deploy/kuberay/rayjob.yaml",
        "kubectl apply -k deploy/kuberay/overlays/nightly",
    ]
    positions = [text.index(s) for s in steps]
    assert positions == sorted(positions)
    for path in set(re.findall(r"(?<![\w/])deploy/[\w./-]+\w", text)):
        if "{" not in path:
            assert (ROOT / path).exists(), path


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*") if p.is_file())
)
def test_every_deploy_file_is_named_in_the_readme(path):
    assert f"`{path}`" in readme_deploy()


def cli(argv: list[str]):
    assert argv[0].endswith("prunesearch"), argv
    return build_parser().parse_args(argv[1:])


def test_the_vm_schedules_run_nightly_with_token_auth():
    service = (DEPLOY / "vm/prunesearch-nightly.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", service, re.M).group(1)
    assert cli(shlex.split(exec_start)).command == "nightly"
    assert re.search(r"^Environment=.*RAY_AUTH_MODE=token", service, re.M)
    line = next(
        ln
        for ln in (DEPLOY / "vm/crontab").read_text().splitlines()
        if ln and not ln.startswith("#")
    )
    command = shlex.split(line.split("&& ", 1)[1])
    assert "RAY_AUTH_MODE=token" in command
    assert cli(command[command.index(".venv/bin/prunesearch") :][:3]).command == "nightly"
