"""What a cluster checks when a manifest is applied, offline.

- KubeRay's CRD schemas, vendored from the release tags in ``schemas/`` (with KubeRay's licence), made
  strict: an unknown field is an error, as with ``kubectl apply`` (strict field validation).
- KubeRay's own validation, which the schemas miss and the operator runs before it creates any pod
  (``ray-operator/controllers/ray/utils/validation.go``, v1.6.2 / v1.7.0): the rules that can apply
  to these manifests, each with the operator's error text.
- Core objects against the strict Kubernetes schemas (kubernetes-validate).
- The "restricted" Pod Security Standard the namespace enforces, for every pod template.
"""

from __future__ import annotations

import copy
import functools
import re
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

SCHEMAS = Path(__file__).parent / "schemas"
KUBERAY_VERSIONS = ("v1.6.2", "v1.7.0")
KUBERNETES_VERSION = "1.33"
# KubeRay feature gates at their defaults (features.go): the deployment enables none.
DEFAULT_GATES = {
    "RayJobDeletionPolicy": True,
    "RayCronJob": False,
    "RayClusterNetworkPolicy": False,
}
MAX_CLUSTER_NAME = 53  # utils.MaxRayClusterNameLength
MAX_JOB_NAME = MAX_CLUSTER_NAME - 6
MAX_CRON_NAME = MAX_JOB_NAME - 11

Obj = dict[str, Any]


# ---- KubeRay CRD schemas -------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """A structural CRD schema as the API server applies it with strict field validation: objects
    with declared properties take nothing else; int-or-string takes both."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(version: str, kind: str) -> jsonschema.Draft7Validator | None:
    """The v1 schema of ``kind`` in KubeRay ``version``; None if that release has no such CRD."""
    for path in sorted((SCHEMAS / f"kuberay-{version}").glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        if crd["spec"]["names"]["kind"] != kind:
            continue
        served = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = _strict(served["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked below
        return jsonschema.Draft7Validator(schema)
    return None


def crd_errors(obj: Obj, version: str) -> list[str]:
    validator = crd_validator(version, obj["kind"])
    if validator is None:
        return [f"KubeRay {version} has no {obj['kind']} CRD"]
    return [
        f"{version} schema: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


# ---- KubeRay validation.go ----------------------------------------------------------------------

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _is_qualified_name(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _env_names(container: Obj) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def _name_errors(obj: Obj, limit: int) -> list[str]:
    name = obj.get("metadata", {}).get("name", "")
    errors = []
    if len(name) > limit:
        errors.append(f"{obj['kind']} name should be no more than {limit} characters")
    if not _DNS1035.match(name) or len(name) > 63:
        errors.append(f"{obj['kind']} name should be a valid DNS1035 label")
    return errors


def _group_errors(name: str, group: Obj) -> list[str]:
    params = group.get("rayStartParams", {})
    errors = []
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get(
        "resources"
    ):
        errors.append(
            f"resource fields should not be set in both rayStartParams and Resources for {name} group"
        )
    if "labels" in params:
        errors.append(f"rayStartParams['labels'] is not supported for {name} group")
    for key, value in group.get("labels", {}).items():
        if not _is_qualified_name(key):
            errors.append(f"invalid label key for {name} group: '{key}'")
        if len(str(value)) > 63 or not _LABEL_VALUE.match(str(value)):
            errors.append(f"invalid label value for key '{key}' in {name} group: '{value}'")
    return errors


def _autoscaling(spec: Obj) -> bool:
    return bool(spec.get("enableInTreeAutoscaling"))


def _autoscaler_v2(spec: Obj) -> bool:
    if (spec.get("autoscalerOptions") or {}).get("version") == "v2":
        return True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    return any(
        e["name"] == "RAY_enable_autoscaler_v2" and e.get("value") in ("1", "true")
        for e in head.get("env", [])
    )


def raycluster_spec_errors(spec: Obj, annotations: Obj, gates: Obj) -> list[str]:
    """ValidateRayClusterSpec: the rules that can apply to a prunesearch cluster."""
    head = spec["headGroupSpec"]
    if not head["template"]["spec"].get("containers"):
        return ["headGroupSpec should have at least one container"]
    errors = _group_errors("Head", head)
    autoscaling = _autoscaling(spec)
    v2 = autoscaling and _autoscaler_v2(spec)
    for group in spec.get("workerGroupSpecs", []):
        name = group["groupName"]
        if not group["template"]["spec"].get("containers"):
            errors.append("workerGroupSpec should have at least one container")
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(
                f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
            )
        if low is not None and low < 0 or high is not None and high < 0:
            errors.append(f"worker group {name} has negative minReplicas or maxReplicas")
        if low is not None and high is not None and low > high:
            errors.append(
                f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"
            )
        errors += _group_errors(name, group)
        if group.get("idleTimeoutSeconds") is not None and not v2:
            errors.append(
                f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled"
            )
        if group.get("suspend") and autoscaling:
            errors.append(f"worker group {name} cannot be suspended with Autoscaler enabled")
        if v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errors.append(
                f"restartPolicy for worker group {name} should be Never or unset when using autoscaler V2"
            )
    head_env = _env_names(head["template"]["spec"]["containers"][0])
    ft = spec.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and ft is not None:
        errors.append("ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set")
    if (
        ft is None
        and annotations.get("ray.io/ft-enabled") != "true"
        and "RAY_REDIS_ADDRESS" in head_env
    ):
        errors.append("RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance")
    if ft is not None:
        if head.get("rayStartParams", {}).get("redis-password"):
            errors.append(
                "cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled"
            )
        if {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & head_env:
            errors.append(
                "cannot set REDIS_PASSWORD / RAY_REDIS_ADDRESS env var in head Pod when GcsFaultToleranceOptions is enabled"
            )
        if annotations.get("ray.io/external-storage-namespace"):
            errors.append(
                "cannot set `ray.io/external-storage-namespace` annotation when GcsFaultToleranceOptions is enabled"
            )
        if ft.get("backend") == "rocksdb":
            errors.append(
                "the embedded RocksDB GCS fault tolerance backend requires the GCSFaultToleranceEmbeddedStorage feature gate"
            )
        elif ft.get("storage") is not None:
            errors.append("cannot set GcsFaultToleranceOptions.Storage when backend is 'redis'")
    if head.get("rayStartParams", {}).get("redis-username") or "REDIS_USERNAME" in head_env:
        errors.append("cannot set redis username in rayStartParams or environment variables")
    if not autoscaling and "RAY_enable_autoscaler_v2" in head_env and _autoscaler_v2(spec):
        errors.append(
            "environment variable RAY_enable_autoscaler_v2 cannot be set when enableInTreeAutoscaling is false"
        )
    if v2 and head["template"]["spec"].get("restartPolicy", "Never") != "Never":
        errors.append(
            "restartPolicy for head Pod should be Never or unset when using autoscaler V2"
        )
    options = spec.get("autoscalerOptions") or {}
    if (options.get("idleTimeoutSeconds") or 0) < 0:
        errors.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        if not spec.get("rayVersion"):
            errors.append("authOptions.mode is 'token' but RayVersion was not specified")
        elif _version(spec["rayVersion"]) < (2, 52, 0):
            errors.append("authOptions.mode is 'token' but minimum Ray version is 2.52.0")
    elif auth.get("enableK8sTokenAuth"):
        errors.append(
            "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"
        )
    if spec.get("networkPolicy") is not None and not gates["RayClusterNetworkPolicy"]:
        errors.append(
            "spec.networkPolicy requires the RayClusterNetworkPolicy feature gate to be enabled"
        )
    if spec.get("historyServerOptions") is not None:
        errors.append("RayClusterHistoryServer feature gate is not enabled")
    if spec.get("tlsOptions") is not None:
        errors.append("spec.tlsOptions requires the RayClusterMTLS feature gate to be enabled")
    return errors


def _deletion_errors(spec: Obj, gates: Obj) -> list[str]:
    """validateDeletionConfiguration and validateDeletionRules."""
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    errors = []
    if not shutdown and (spec.get("ttlSecondsAfterFinished") or 0) > 0:
        errors.append(
            "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
        )
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return errors
    if not gates["RayJobDeletionPolicy"]:
        return [
            *errors,
            "RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy",
        ]
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = strategy.get("deletionRules") or []
    if rules and shutdown:
        errors.append(
            "spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive"
        )
    if rules and legacy:
        errors.append(
            "Cannot use both legacy onSuccess/onFailure fields and deletionRules simultaneously"
        )
    if not rules and not legacy:
        errors.append(
            "DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules field"
        )
    seen: set[tuple[str, str, str]] = set()
    for i, rule in enumerate(rules):
        condition = rule.get("condition", {})
        kinds = [k for k in ("jobStatus", "jobDeploymentStatus") if k in condition]
        if len(kinds) != 1:
            errors.append(
                f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus must be set"
            )
            continue
        if condition.get("ttlSeconds", 0) < 0:
            errors.append(f"deletionRules[{i}]: TTLSeconds must be non-negative")
        if spec.get("clusterSelector") and rule["policy"] in ("DeleteCluster", "DeleteWorkers"):
            errors.append(
                f"deletionRules[{i}]: DeletionPolicyType '{rule['policy']}' not supported when ClusterSelector is set"
            )
        key = (kinds[0], condition[kinds[0]], rule["policy"])
        if key in seen:
            errors.append(
                f"deletionRules[{i}]: duplicate rule for DeletionPolicyType '{rule['policy']}'"
            )
        seen.add(key)
    return errors


def rayjob_spec_errors(spec: Obj, annotations: Obj, gates: Obj) -> list[str]:
    """ValidateRayJobSpec."""
    errors = []
    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        errors.append(
            "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
        )
    if (spec.get("ttlSecondsAfterFinished") or 0) < 0:
        errors.append("TTLSecondsAfterFinished must be a non-negative integer")
    errors += _deletion_errors(spec, gates)
    if spec.get("suspend") and selector:
        errors.append("the ClusterSelector mode doesn't support the suspend operation")
    if spec.get("rayClusterSpec") is None and not selector:
        errors.append("one of RayClusterSpec or ClusterSelector must be set")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append("cluster name in ClusterSelector should not be empty")
        if mode == "SidecarMode":
            errors.append("ClusterSelector is not supported in SidecarMode")
        if (spec.get("backoffLimit") or 0) > 0:
            errors.append("BackoffLimit is incompatible with ClusterSelector mode")
    if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
        errors.append("BackoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode" and spec.get("submitterPodTemplate") is not None:
        errors.append("Currently, SidecarMode doesn't support SubmitterPodTemplate")
    if spec.get("rayClusterSpec") is not None:
        errors += raycluster_spec_errors(spec["rayClusterSpec"], annotations, gates)
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
        if not isinstance(runtime_env, dict):
            raise yaml.YAMLError("not a mapping")
    except yaml.YAMLError as exc:
        errors.append(f"runtimeEnvYAML is not a valid YAML mapping: {exc}")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            errors.append(f"{field} must be a positive integer")
    if (spec.get("backoffLimit") or 0) < 0:
        errors.append("backoffLimit must be a positive integer")
    return errors


_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
_CRON_NAMES = re.compile(r"^[A-Za-z]{3}(-[A-Za-z]{3})?(,[A-Za-z]{3}(-[A-Za-z]{3})?)*$")
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def cron_errors(schedule: str) -> list[str]:
    """robfig/cron ParseStandard: five fields (or a @descriptor), each in range."""
    if schedule.startswith("@"):
        ok = schedule in {
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
        }
        return (
            [] if ok or schedule.startswith("@every ") else [f"invalid cron schedule: {schedule}"]
        )
    fields = schedule.split()
    if len(fields) != 5:
        return [
            f"invalid cron schedule: expected exactly 5 fields, found {len(fields)}: {schedule}"
        ]
    for text, (low, high) in zip(fields, _CRON_RANGES, strict=True):
        if _CRON_NAMES.match(text):
            continue
        numbers = [int(n) for n in re.findall(r"\d+", re.sub(r"/\d+", "", text))]
        if not _CRON_FIELD.match(text) or any(not low <= n <= high for n in numbers):
            return [f"invalid cron schedule: {text!r} in {schedule}"]
    return []


def raycronjob_errors(obj: Obj, gates: Obj) -> list[str]:
    """ValidateRayCronJobSpec (the operator runs it only with the RayCronJob gate on)."""
    spec = obj["spec"]
    errors = _name_errors(obj, MAX_CRON_NAME)
    if "TZ" in spec["schedule"]:
        errors.append("cannot use TZ or CRON_TZ in schedule, use timeZone field instead")
    errors += cron_errors(spec["schedule"])
    if "timeZone" in spec:
        if spec["timeZone"] == "":
            errors.append("timeZone must not be empty string")
        else:
            try:
                zoneinfo.ZoneInfo(spec["timeZone"])
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                errors.append(f"invalid time zone: {spec['timeZone']}")
    job = rayjob_spec_errors(
        spec["jobTemplate"], obj.get("metadata", {}).get("annotations", {}), gates
    )
    return errors + [f"invalid RayJob template: {e}" for e in job]


def kuberay_errors(obj: Obj, gates: Obj | None = None) -> list[str]:
    """What the KubeRay operator refuses (InvalidRayClusterSpec / InvalidRayJobSpec events)."""
    gates = gates or DEFAULT_GATES
    annotations = obj.get("metadata", {}).get("annotations", {})
    if obj["kind"] == "RayCluster":
        return _name_errors(obj, MAX_CLUSTER_NAME) + raycluster_spec_errors(
            obj["spec"], annotations, gates
        )
    if obj["kind"] == "RayJob":
        return _name_errors(obj, MAX_JOB_NAME) + rayjob_spec_errors(obj["spec"], annotations, gates)
    if obj["kind"] == "RayCronJob":
        return raycronjob_errors(obj, gates)
    raise ValueError(f"not a KubeRay kind: {obj['kind']}")


# ---- core objects ---------------------------------------------------------------------------------


def core_errors(obj: Obj) -> list[str]:
    """kubectl apply's strict field validation, offline (kubernetes-validate's strict schemas)."""
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{obj['kind']}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


# ---- Pod Security "restricted" ---------------------------------------------------------------------


def pod_templates(obj: Obj) -> Iterator[tuple[str, Obj]]:
    """(where, pod template spec) of every pod an object makes."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "RayCluster":
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]["spec"]
    elif kind in ("RayJob", "RayCronJob"):
        job = spec["jobTemplate"] if kind == "RayCronJob" else spec
        if "submitterPodTemplate" in job:
            yield "submitter", job["submitterPodTemplate"]["spec"]
    elif kind == "CronJob":
        yield "job", spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("Deployment", "StatefulSet", "Job"):
        yield kind, spec["template"]["spec"]


def restricted_errors(where: str, pod: Obj, extra: list[Obj] = ()) -> list[str]:
    """The restricted Pod Security Standard's checks (the ones a template can fail)."""
    errors = []
    pod_ctx = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            errors.append(f"{where}: {flag} is forbidden")
    if any("hostPath" in v for v in pod.get("volumes", [])):
        errors.append(f"{where}: hostPath volumes are forbidden")
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *extra]
    for c in containers:
        ctx = c.get("securityContext") or {}
        name = f"{where}/{c.get('name', 'autoscaler')}"
        if ctx.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in (ctx.get("capabilities") or {}).get("drop", []):
            errors.append(f"{name}: capabilities must drop ALL")
        if set((ctx.get("capabilities") or {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            errors.append(f"{name}: only NET_BIND_SERVICE may be added")
        if ctx.get("privileged"):
            errors.append(f"{name}: privileged is forbidden")
        if (
            not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot"))
            or ctx.get("runAsNonRoot") is False
        ):
            errors.append(f"{name}: runAsNonRoot must be true")
        if 0 in (ctx.get("runAsUser"), pod_ctx.get("runAsUser")):
            errors.append(f"{name}: runAsUser must not be 0")
        seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
    return errors


def pod_security_errors(obj: Obj) -> list[str]:
    errors = []
    for where, pod in pod_templates(obj):
        extra = []
        if obj["kind"] == "RayCluster" and where == "head" and _autoscaling(obj["spec"]):
            # KubeRay adds the autoscaler sidecar to the head pod with autoscalerOptions.securityContext.
            options = obj["spec"].get("autoscalerOptions") or {}
            extra = [{"name": "autoscaler", "securityContext": options.get("securityContext")}]
        errors += restricted_errors(where, pod, extra)
    return errors
