"""deploy/kuberay checked the way the cluster checks it: KubeRay's CRD schemas (both supported
releases), KubeRay's validation rules, strict Kubernetes schemas, the restricted Pod Security
Standard, and the shape prunesearch needs (autoscaled trainers off the target pool, token auth,
GCS fault tolerance, the config where the driver runs). The kustomize overlays are built with
`kubectl kustomize` (skipped, saying so, where kubectl is missing); each file is also checked alone.
A broken copy of each manifest must fail (the mutations at the end)."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import config_from_dict
from orchestrator.cli import build_parser

from . import checks

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
OVERLAYS = ("cpu", "gpu", "nightly")
FILES = (
    "namespace.yaml",
    "base/raycluster.yaml",
    "base/redis.yaml",
    "base/networkpolicy.yaml",
    "overlays/nightly/cronjob.yaml",
    "rayjob.yaml",
    "raycronjob.yaml",
)
POOL = "prunesearch.io/pool"
TOKEN_SECRET = "prunesearch-ray-token"
CLIENT_LABEL = "prunesearch.io/ray-client"
Obj = dict[str, Any]


def pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if re.split(r"[\[=]", d)[0] == package)


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def load(rel: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all((KUBERAY / rel).read_text()) if d]


def build(overlay: str) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: overlays not built")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUBERAY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def cli(argv: list[str]):
    """What our own CLI makes of a command line (argparse exits on anything unknown)."""
    assert argv[0] == "prunesearch", argv
    return build_parser().parse_args(argv[1:])


# ---- what prunesearch needs of each kind ----------------------------------------------------------


def _containers(pod: Obj) -> list[Obj]:
    return pod.get("containers", [])


def _image_errors(obj: Obj) -> list[str]:
    errors = []
    for where, pod in checks.pod_templates(obj):
        for c in _containers(pod):
            image = c["image"]
            tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
            if "@sha256:" in image:
                continue
            if not tag or tag == "latest" or not re.search(r"\d+\.\d+", tag):
                errors.append(f"{where}: image {image} floats (pin a version tag or a digest)")
            elif image.startswith("ghcr.io/example/prunesearch") and version() not in tag:
                errors.append(f"{where}: image {image} is not prunesearch {version()}")
    return errors


def _shm_errors(where: str, pod: Obj) -> list[str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = [
        m for m in _containers(pod)[0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"
    ]
    empty = volumes.get(mounts[0]["name"], {}).get("emptyDir", {}) if mounts else {}
    if empty.get("medium") != "Memory" or "sizeLimit" not in empty:
        return [f"{where}: /dev/shm must be a memory emptyDir with a sizeLimit"]
    return []


def _pool_errors(group: Obj) -> list[str]:
    name, pod = group["groupName"], group["template"]["spec"]
    pool = (pod.get("nodeSelector") or {}).get(POOL)
    tolerated = {t.get("value") for t in pod.get("tolerations", []) if t.get("key") == POOL}
    if pool is None:
        return [f"{name}: no nodeSelector {POOL}: its pods can land on any pool"]
    if tolerated != {pool}:
        return [f"{name}: tolerates pools {sorted(map(str, tolerated))}, must tolerate only {pool}"]
    return []


def raycluster_shape(obj: Obj) -> list[str]:
    spec = obj["spec"]
    errors = []
    if spec.get("rayVersion") != pin("ray"):
        errors.append(f"rayVersion {spec.get('rayVersion')} is not the pinned ray {pin('ray')}")
    if not spec.get("enableInTreeAutoscaling"):
        errors.append("enableInTreeAutoscaling is off: minReplicas/maxReplicas are ignored")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token" or auth.get("secretName") != TOKEN_SECRET:
        errors.append(f"authOptions must be {{mode: token, secretName: {TOKEN_SECRET}}}")
    ft = spec.get("gcsFaultToleranceOptions") or {}
    if not ft.get("redisAddress") or "secretKeyRef" not in (ft.get("redisPassword") or {}).get(
        "valueFrom", {}
    ):
        errors.append("gcsFaultToleranceOptions (Redis, password from a Secret) is missing")
    head = spec["headGroupSpec"]
    if head.get("serviceType") != "ClusterIP":
        errors.append("the head Service must be ClusterIP")
    if head.get("resources", {}).get("CPU") != "0":
        errors.append("the head must run no trials (resources: {CPU: '0'})")
    errors += _shm_errors("head", head["template"]["spec"])
    groups = {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}
    if set(groups) != {"trainers", "target"}:
        errors.append(f"worker groups {sorted(groups)} are not trainers and target")
    for group in groups.values():
        errors += _pool_errors(group) + _shm_errors(group["groupName"], group["template"]["spec"])
    return errors


def _submitter_errors(job: Obj) -> list[str]:
    """RayJob spec (or a RayCronJob's jobTemplate): the config must reach the head."""
    errors = []
    pod = job.get("submitterPodTemplate", {})
    if pod.get("metadata", {}).get("labels", {}).get(CLIENT_LABEL) != "true":
        errors.append(f"submitter pods lack the label {CLIENT_LABEL}=true (NetworkPolicy)")
    mounts = {
        m["name"]: m["mountPath"]
        for c in _containers(pod.get("spec", {}))
        for m in c.get("volumeMounts", [])
    }
    maps = {
        v["name"]: v["configMap"]["name"]
        for v in pod.get("spec", {}).get("volumes", [])
        if "configMap" in v
    }
    config_dirs = {mounts[n] for n in maps if n in mounts}
    try:
        runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "") or {}
    except yaml.YAMLError:
        runtime_env = {}  # said by checks.rayjob_spec_errors
    if runtime_env.get("working_dir") not in config_dirs:
        errors.append(
            "the entrypoint runs on the head: runtimeEnvYAML.working_dir must be the submitter's "
            f"config mount {sorted(config_dirs)} (it is {runtime_env.get('working_dir')!r})"
        )
    args = cli(shlex.split(job["entrypoint"]))
    if Path(args.config).is_absolute():
        errors.append(f"the entrypoint reads {args.config}, a path on the submitter, not the head")
    rules = (job.get("deletionStrategy") or {}).get("deletionRules", [])
    covered = {r["condition"].get("jobStatus") for r in rules if r["policy"] == "DeleteSelf"}
    if not {"SUCCEEDED", "FAILED"} <= covered:
        errors.append("no DeleteSelf rules for SUCCEEDED and FAILED: finished RayJobs pile up")
    if not job.get("activeDeadlineSeconds"):
        errors.append("no activeDeadlineSeconds: a hung job runs forever")
    return errors


def rayjob_shape(obj: Obj) -> list[str]:
    errors = _submitter_errors(obj["spec"])
    if cli(shlex.split(obj["spec"]["entrypoint"])).command != "run":
        errors.append("the one-off RayJob must run `prunesearch run`")
    return errors


def raycronjob_shape(obj: Obj) -> list[str]:
    spec = obj["spec"]
    errors = _submitter_errors(spec["jobTemplate"])
    if cli(shlex.split(spec["jobTemplate"]["entrypoint"])).command != "nightly":
        errors.append("the RayCronJob must run `prunesearch nightly`")
    if not spec.get("timeZone"):
        errors.append("no timeZone: the schedule is in the operator's local time")
    return errors


def cronjob_shape(obj: Obj) -> list[str]:
    spec = obj["spec"]
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]
    errors = []
    if spec.get("concurrencyPolicy") != "Forbid" or not spec.get("timeZone"):
        errors.append("the CronJob must be concurrencyPolicy Forbid with a timeZone")
    if not 0 < job.get("activeDeadlineSeconds", 0) < 86400:
        errors.append(
            "jobTemplate needs activeDeadlineSeconds under a day: a hung --wait pod would block every later night"
        )
    if not job.get("ttlSecondsAfterFinished"):
        errors.append("jobTemplate needs ttlSecondsAfterFinished")
    if pod.get("metadata", {}).get("labels", {}).get(CLIENT_LABEL) != "true":
        errors.append(f"the nightly pod lacks the label {CLIENT_LABEL}=true (NetworkPolicy)")
    container = pod["spec"]["containers"][0]
    args = cli(["prunesearch", *container["args"]])  # the image's ENTRYPOINT is prunesearch
    if not (args.command == "submit" and args.nightly and args.wait):
        errors.append("the CronJob must run `prunesearch submit --nightly --wait`")
    if args.address != "http://prunesearch-head-svc:8265":
        errors.append(f"it submits to {args.address}, not the head's Service")
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    if container.get("workingDir") not in mounts:
        errors.append("submit uploads its working directory: workingDir must be the config mount")
    env = {e["name"]: e for e in container.get("env", [])}
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token" or ref.get("name") != TOKEN_SECRET:
        errors.append(
            "the nightly pod must send the cluster's token (RAY_AUTH_MODE, RAY_AUTH_TOKEN)"
        )
    return errors


def namespace_shape(obj: Obj) -> list[str]:
    labels = obj["metadata"].get("labels", {})
    if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
        return ["the namespace must enforce the restricted Pod Security Standard"]
    return []


SHAPES: dict[str, Callable[[Obj], list[str]]] = {
    "RayCluster": raycluster_shape,
    "RayJob": rayjob_shape,
    "RayCronJob": raycronjob_shape,
    "CronJob": cronjob_shape,
    "Namespace": namespace_shape,
}


def kuberay_versions(obj: Obj) -> tuple[str, ...]:
    # RayCronJob's timeZone is new in 1.7 (its file says so); the rest runs on 1.6 and 1.7.
    return ("v1.7.0",) if obj["kind"] == "RayCronJob" else checks.KUBERAY_VERSIONS


def errors_of(obj: Obj) -> list[str]:
    """Everything the API server, the KubeRay operator, Pod Security admission and our own
    expectations would say about one object."""
    if obj["apiVersion"].startswith("ray.io/"):
        errors = [e for v in kuberay_versions(obj) for e in checks.crd_errors(obj, v)]
        errors += checks.kuberay_errors(obj)
    else:
        errors = checks.core_errors(obj)
    errors += checks.pod_security_errors(obj) + _image_errors(obj)
    return errors + SHAPES.get(obj["kind"], lambda _: [])(obj)


# ---- the files, alone and as built -----------------------------------------------------------------


@pytest.mark.parametrize("rel", FILES)
def test_each_manifest_passes_what_the_cluster_checks(rel):
    for obj in load(rel):
        assert errors_of(obj) == [], f"{rel} {obj['kind']}"


def test_the_raycronjob_needs_kuberay_1_7_and_says_so():
    obj = load("raycronjob.yaml")[0]
    assert any("timeZone" in e for e in checks.crd_errors(obj, "v1.6.2"))
    assert "KubeRay >= 1.7" in (KUBERAY / "raycronjob.yaml").read_text()
    assert "--feature-gates=RayCronJob=true" in (KUBERAY / "raycronjob.yaml").read_text()


def test_every_kuberay_file_asks_for_kuberay_1_6_or_later():
    for path in KUBERAY.rglob("*.yaml"):
        for found in re.findall(r"KubeRay >= (\d+\.\d+)", path.read_text()):
            assert tuple(map(int, found.split("."))) >= (1, 6), path
    assert "KubeRay >= 1.6" in (KUBERAY / "base/raycluster.yaml").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_builds_into_objects_that_pass(overlay):
    objects = build(overlay)
    kinds = sorted(o["kind"] for o in objects)
    expected = [
        "ConfigMap",
        "NetworkPolicy",
        "NetworkPolicy",
        "RayCluster",
        "Service",
        "StatefulSet",
    ]
    assert kinds == sorted(expected + (["CronJob"] if overlay == "nightly" else []))
    for obj in objects:
        assert obj["metadata"].get("namespace") == "prunesearch", obj["kind"]
        assert errors_of(obj) == [], f"{overlay} {obj['kind']}"
    assert fit_errors(objects) == []


# ---- the search config against the cluster it runs on ------------------------------------------------


def _quantity(text: Any) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def fit_errors(objects: list[Obj]) -> list[str]:
    """The ConfigMap's search config is valid and fits the RayCluster: trials only on trainers,
    timing only on the target group, each within its pod's limits; and the NetworkPolicies
    cover the Ray pods and Redis."""
    by_kind = {o["kind"]: o for o in objects}
    config = config_from_dict(yaml.safe_load(by_kind["ConfigMap"]["data"]["search.yaml"]))
    groups = {g["groupName"]: g for g in by_kind["RayCluster"]["spec"]["workerGroupSpecs"]}
    trainers, target = groups["trainers"], groups["target"]
    limits = trainers["template"]["spec"]["containers"][0]["resources"]["limits"]
    errors = []
    if not set(config.resources.custom) <= set(trainers.get("resources", {})):
        errors.append(f"trials ask for {dict(config.resources.custom)}, which trainers lack")
    if set(config.resources.custom) & set(target.get("resources", {})):
        errors.append("the target group has the trainers' resource: trials would land there")
    if config.resources.num_cpus > _quantity(limits["cpu"]):
        errors.append("a trial asks for more CPUs than a trainer pod has")
    if config.resources.num_gpus > _quantity(limits.get("nvidia.com/gpu", 0)):
        errors.append("a trial asks for a GPU that trainer pods do not have")
    for t in config.targets:
        if not set(t.resources) <= set(target.get("resources", {})) or set(t.resources) & set(
            trainers.get("resources", {})
        ):
            errors.append(
                f"target {t.name}: resources {dict(t.resources)} are not the target group's alone"
            )
        if any(target.get("labels", {}).get(k) != v for k, v in t.label_selector.items()):
            errors.append(
                f"target {t.name}: label_selector {dict(t.label_selector)} does not match the target group"
            )
        gpu = target["template"]["spec"]["containers"][0]["resources"]["limits"].get(
            "nvidia.com/gpu"
        )
        if t.device.startswith("cuda") and not gpu:
            errors.append(f"target {t.name} times on CUDA but the target group has no GPU")
    selected = [
        p["spec"]["podSelector"]["matchLabels"] for p in objects if p["kind"] == "NetworkPolicy"
    ]
    if {"ray.io/cluster": "prunesearch"} not in selected or {
        "app.kubernetes.io/name": "prunesearch-redis"
    } not in selected:
        errors.append("NetworkPolicies must select the Ray pods and Redis")
    return errors


# ---- a broken copy of each manifest fails --------------------------------------------------------------


def _at(obj: Obj, path: str) -> tuple[Any, str]:
    *parents, leaf = path.split(".")
    node = obj
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, leaf


def setp(path: str, value: Any) -> Callable[[Obj], None]:
    def apply(obj: Obj) -> None:
        node, leaf = _at(obj, path)
        node[int(leaf) if isinstance(node, list) else leaf] = value

    return apply


def delp(path: str) -> Callable[[Obj], None]:
    def apply(obj: Obj) -> None:
        node, leaf = _at(obj, path)
        del node[int(leaf) if isinstance(node, list) else leaf]

    return apply


HEAD = "spec.headGroupSpec"
TRAINERS = "spec.workerGroupSpecs.0"
TARGET = "spec.workerGroupSpecs.1"
CRON_JOB = "spec.jobTemplate.spec"
CRON_POD = "spec.jobTemplate.spec.template.spec"
MUTATIONS = [
    # (file, mutation, what must be said)
    (
        "base/raycluster.yaml",
        setp(f"{TARGET}.rayStartParams", {"labels": "hw=cpu"}),
        "rayStartParams['labels'] is not supported",
    ),
    (
        "base/raycluster.yaml",
        setp(f"{TRAINERS}.rayStartParams", {"resources": '"{\\"trainer\\": 1}"'}),
        "should not be set in both rayStartParams and Resources",
    ),
    ("base/raycluster.yaml", setp(f"{TARGET}.labels", {"hw": "t4 gpu"}), "invalid label value"),
    ("base/raycluster.yaml", setp(f"{TRAINERS}.minReplicas", 9), "greater than maxReplicas"),
    (
        "base/raycluster.yaml",
        delp("spec.enableInTreeAutoscaling"),
        "minReplicas/maxReplicas are ignored",
    ),
    ("base/raycluster.yaml", setp("spec.rayVersion", "2.51.0"), "minimum Ray version is 2.52.0"),
    (
        "base/raycluster.yaml",
        setp(f"{HEAD}.template.spec.restartPolicy", "Always"),
        "should be Never or unset when using autoscaler V2",
    ),
    (
        "base/raycluster.yaml",
        setp(f"{HEAD}.rayStartParams.redis-password", "x"),
        "cannot set `redis-password`",
    ),
    (
        "base/raycluster.yaml",
        setp(f"{HEAD}.unknownField", 1),
        "Additional properties are not allowed",
    ),
    (
        "base/raycluster.yaml",
        setp("spec.networkPolicy", {}),
        "RayClusterNetworkPolicy feature gate",
    ),
    ("base/raycluster.yaml", setp("metadata.name", "Prunesearch"), "valid DNS1035 label"),
    ("base/raycluster.yaml", delp("spec.gcsFaultToleranceOptions"), "gcsFaultToleranceOptions"),
    ("base/raycluster.yaml", delp("spec.authOptions"), "authOptions must be"),
    (
        "base/raycluster.yaml",
        delp(f"{TRAINERS}.template.spec.tolerations"),
        "must tolerate only trainers",
    ),
    (
        "base/raycluster.yaml",
        setp(f"{TRAINERS}.template.spec.tolerations.0.value", "target"),
        "must tolerate only trainers",
    ),
    ("base/raycluster.yaml", delp(f"{TARGET}.template.spec.nodeSelector"), "no nodeSelector"),
    (
        "base/raycluster.yaml",
        delp(f"{TRAINERS}.template.spec.securityContext"),
        "runAsNonRoot must be true",
    ),
    (
        "base/raycluster.yaml",
        delp("spec.autoscalerOptions.securityContext"),
        "head/autoscaler: allowPrivilegeEscalation",
    ),
    (
        "base/raycluster.yaml",
        delp(f"{HEAD}.template.spec.volumes"),
        "/dev/shm must be a memory emptyDir",
    ),
    (
        "base/raycluster.yaml",
        setp(f"{TRAINERS}.template.spec.containers.0.image", "ghcr.io/example/prunesearch:cuda"),
        "floats",
    ),
    ("overlays/nightly/cronjob.yaml", setp("spec.backoffLimit", 0), "backoffLimit"),
    (
        "overlays/nightly/cronjob.yaml",
        delp(f"{CRON_JOB}.activeDeadlineSeconds"),
        "activeDeadlineSeconds under a day",
    ),
    (
        "overlays/nightly/cronjob.yaml",
        delp(f"{CRON_JOB}.ttlSecondsAfterFinished"),
        "ttlSecondsAfterFinished",
    ),
    (
        "overlays/nightly/cronjob.yaml",
        setp(
            f"{CRON_POD}.containers.0.args",
            ["submit", "search.yaml", "--nightly", "--address", "http://prunesearch-head-svc:8265"],
        ),
        "--nightly --wait",
    ),
    ("overlays/nightly/cronjob.yaml", delp(f"{CRON_POD}.securityContext"), "seccompProfile"),
    ("rayjob.yaml", delp("spec.runtimeEnvYAML"), "runtimeEnvYAML.working_dir must be"),
    (
        "rayjob.yaml",
        setp("spec.entrypoint", "prunesearch run /configs/search.yaml"),
        "a path on the submitter",
    ),
    (
        "rayjob.yaml",
        setp("spec.deletionStrategy.deletionRules.0.policy", "DeleteCluster"),
        "not supported when ClusterSelector is set",
    ),
    (
        "rayjob.yaml",
        setp("spec.backoffLimit", 2),
        "BackoffLimit is incompatible with ClusterSelector",
    ),
    ("rayjob.yaml", delp("spec.deletionStrategy"), "finished RayJobs pile up"),
    (
        "rayjob.yaml",
        setp("spec.runtimeEnvYAML", "working_dir: [/configs"),
        "runtimeEnvYAML is not a valid YAML",
    ),
    (
        "rayjob.yaml",
        setp("spec.submissionMode", "SidecarMode"),
        "ClusterSelector is not supported in SidecarMode",
    ),
    ("raycronjob.yaml", setp("spec.schedule", "CRON_TZ=UTC 0 1 * * *"), "cannot use TZ or CRON_TZ"),
    ("raycronjob.yaml", setp("spec.schedule", "0 25 * * *"), "invalid cron schedule"),
    ("raycronjob.yaml", setp("spec.timeZone", "Mars/Olympus"), "invalid time zone"),
    ("raycronjob.yaml", delp("spec.timeZone"), "no timeZone"),
    ("raycronjob.yaml", delp("spec.jobTemplate.deletionStrategy"), "finished RayJobs pile up"),
    (
        "raycronjob.yaml",
        setp("metadata.name", "prunesearch-nightly-compression-for-the-t4"),
        "no more than 36 characters",
    ),
    (
        "base/redis.yaml",
        setp("1.spec.template.spec.containers.0.securityContext.privileged", True),
        "privileged is forbidden",
    ),
    ("base/redis.yaml", setp("1.spec.replica", 1), "replica"),
    ("base/networkpolicy.yaml", setp("0.spec.ingress.1.port", 8265), "port"),  # belongs in `ports`
    ("namespace.yaml", delp("metadata.labels"), "restricted Pod Security Standard"),
]


@pytest.mark.parametrize(
    ("rel", "mutate", "said"),
    MUTATIONS,
    ids=[f"{rel}:{said[:40]}" for rel, _, said in MUTATIONS],
)
def test_a_broken_copy_of_each_manifest_fails(rel, mutate, said):
    broken = copy.deepcopy(load(rel))
    # Paths into a multi-document file start with the document's index.
    mutate(broken if len(broken) > 1 else broken[0])
    errors = [e for obj in broken for e in errors_of(obj)]
    assert any(said in e for e in errors), errors


def test_the_gpu_overlay_puts_trials_and_timing_on_gpus_and_a_misfit_config_fails():
    objects = build("gpu")
    cluster = next(o for o in objects if o["kind"] == "RayCluster")
    trainers, target = cluster["spec"]["workerGroupSpecs"]
    assert (
        trainers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == "1"
    )
    assert target["labels"] == {"hw": "t4"} and target["resources"] == {"target_t4": "1"}
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    raw = yaml.safe_load(config_map["data"]["search.yaml"])
    for change, said in [
        (
            {"target": {**raw["target"], "label_selector": {"hw": "cpu"}}},
            "does not match the target group",
        ),
        ({"resources": {**raw["resources"], "custom": {"target_t4": 1}}}, "which trainers lack"),
        ({"resources": {**raw["resources"], "num_gpus": 2}}, "a GPU that trainer pods do not have"),
    ]:
        broken = copy.deepcopy(objects)
        cm = next(o for o in broken if o["kind"] == "ConfigMap")
        cm["data"]["search.yaml"] = yaml.safe_dump({**raw, **change})
        assert any(said in e for e in fit_errors(broken)), change
