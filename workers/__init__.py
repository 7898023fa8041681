"""What one trial does on one machine: prune, measure, finetune, evaluate, save."""

from __future__ import annotations

from ._criteria import CRITERIA, BaseGradients, Criterion, Gradients, get_criterion
from ._digits import DigitsNet, build_digits, load_or_train
from ._group_timing import GROUP_SHARE, measure_group
from ._inputs import batch_size_of, tensors, tree_map
from ._io import (
    PRUNED_ATTRIBUTES,
    PrunedModelError,
    base_fingerprint,
    load_pruned,
    pruned_bytes,
    read_plan,
    save_pruned,
    state_digest,
)
from ._latency import (
    LatencyStats,
    Target,
    calibrate,
    log_ratio_centre,
    measure_latency,
    measure_relative,
    rebase,
)
from ._onnx import DYNAMO, TORCHSCRIPT, onnx_opset, write_onnx
from ._profile import profile_groups, profile_job
from ._progress import steps
from ._proxy import RIDGE, OutputHead, proxy_measures
from ._prune import apply_plan, channel_counts, count_macs_params
from ._recovery import TEACHER_COST, Trainer, recipe
from ._result import TrialLatency, TrialResult, TrialStatus
from ._screen import (
    AUTO_STEPS,
    SCREEN_STAGES,
    ScreenResult,
    adapt_batchnorm,
    adapting,
    has_batchnorm,
    proxy_batches,
    screen_candidates,
)
from ._sensitivity import scan_groups, upper_bounds
from ._shifted_digits import shift
from ._task_roots import ENTRY_POINT_GROUP, TASK_PATH_VAR, add_task_root, task_roots, task_source
from ._tasks import CACHE_VAR, Task, build_task, cache_dir, resolve_task
from ._train import Distill, accuracy, evaluate, finetune, refresh_stale_norms
from ._trial import ConstraintRules, cached_task, run_trial

__all__ = [
    "AUTO_STEPS",
    "CACHE_VAR",
    "BaseGradients",
    "CRITERIA",
    "DYNAMO",
    "ENTRY_POINT_GROUP",
    "GROUP_SHARE",
    "PRUNED_ATTRIBUTES",
    "RIDGE",
    "TASK_PATH_VAR",
    "TEACHER_COST",
    "TORCHSCRIPT",
    "ConstraintRules",
    "Criterion",
    "DigitsNet",
    "Distill",
    "Gradients",
    "LatencyStats",
    "OutputHead",
    "PrunedModelError",
    "SCREEN_STAGES",
    "ScreenResult",
    "Target",
    "Task",
    "Trainer",
    "TrialLatency",
    "TrialResult",
    "TrialStatus",
    "accuracy",
    "adapt_batchnorm",
    "adapting",
    "batch_size_of",
    "add_task_root",
    "apply_plan",
    "base_fingerprint",
    "build_digits",
    "build_task",
    "cache_dir",
    "cached_task",
    "calibrate",
    "channel_counts",
    "count_macs_params",
    "evaluate",
    "finetune",
    "get_criterion",
    "has_batchnorm",
    "load_or_train",
    "load_pruned",
    "log_ratio_centre",
    "measure_group",
    "measure_latency",
    "measure_relative",
    "onnx_opset",
    "profile_groups",
    "profile_job",
    "proxy_batches",
    "proxy_measures",
    "pruned_bytes",
    "read_plan",
    "refresh_stale_norms",
    "rebase",
    "recipe",
    "resolve_task",
    "run_trial",
    "save_pruned",
    "scan_groups",
    "screen_candidates",
    "shift",
    "state_digest",
    "steps",
    "task_roots",
    "task_source",
    "tensors",
    "tree_map",
    "upper_bounds",
    "write_onnx",
]
