"""One search end to end: prepare the task, measure the base model, screen, run the dispatch
loop with its listeners, then the front to MLflow and the registry.

The orchestrator is the single writer of the study and of MLflow (``_loop`` dispatches,
``_listeners`` tell and record, ``_ask`` builds each trial).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import optuna
import ray
from optuna.trial import TrialState

from search_space import (
    Discovery,
    Profile,
    SearchSpace,
    architecture_signature,
    check_patterns,
    discover,
)
from workers import (
    ConstraintRules,
    Task,
    TrialResult,
    adapting,
    build_task,
    has_batchnorm,
)

from ._ask import SearchContext, TrialSpec, anchor_trials, anchored_ask, ask_trial
from ._base_model import RaySide, measure_base
from ._cluster import check_placeable, check_room_for_trials, ensure_ray
from ._config import Config
from ._console import clipped, plural
from ._errors import one_line
from ._listeners import search_loop
from ._loop import Loop
from ._pareto import front, front_table, hypervolume, points
from ._plots import sensitivity_figure
from ._registry import Registered, register_front
from ._report import front_views
from ._schema import to_plain
from ._screen import ScreenOutcome, ScreenSetup, group_profile, run_screen, stage_shares
from ._select import ScreenedStudy, proxy_quality
from ._sensitivity import STUDY_ATTR as SENSITIVITY_ATTR
from ._sensitivity import narrowed, sensitivity
from ._services import (
    RemoteMeasure,
    RemoteRules,
    profile_task,
    reserved_cpus,
    screen_task,
    start_benches,
    start_board,
    trial_task,
    warm_workers,
)
from ._study import (
    fail_orphans,
    load_latency_cache,
    open_study,
    result_of,
    warm_start,
)
from ._tracking import SearchRecorder
from ._writer import is_outage

Progress = Callable[[str], None]


@dataclass
class Prepared:
    """Everything checked before any cluster work: the task builds, the model traces."""

    config: Config
    task: Task
    discovery: Discovery
    space: SearchSpace  # the config's space, narrowed by a sensitivity scan when enabled


@dataclass
class Outcome:
    study_name: str
    parent_run_id: str
    base: dict[str, float]
    front: list[dict[str, Any]]
    counts: dict[str, int]
    stopped_by: str
    hypervolume: float = 0.0
    results: list[TrialResult] = field(default_factory=list)
    registered: list[Registered] = field(default_factory=list)
    unlogged: int = 0  # MLflow records that could not be written (the server stayed unreachable)
    unregistered: dict[int, str] = field(default_factory=dict)  # front trial -> why it failed


def prepare(config: Config) -> Prepared:
    task = build_task(config.task, config.task_options)
    space = config.search.space
    discovery = discover(task.model, task.example_inputs, exclude=space.exclude)
    check_patterns(space.overrides, discovery.names, field_name="search.space.overrides")
    if not discovery.groups:
        if space.exclude:
            raise ValueError(
                f"search.space.exclude: {list(space.exclude)} leaves task {config.task} no prunable "
                "layer; loosen the patterns (`prunesearch check` lists the layers and why any was left out)"
            )
        raise ValueError(
            f"task {config.task}: the model has no prunable layers (left out: {discovery.excluded}); "
            "pruning needs Conv/Linear layers whose output channels are not the network's output "
            "(`prunesearch check` lists why each layer was left out)"
        )
    return Prepared(config, task, discovery, space)


def run_search(prepared: Prepared, progress: Progress = print) -> Outcome:
    """Run (or resume) the search ``prepared`` describes: base model, screen, the dispatch loop,
    then the front to MLflow and the registry. ``progress`` gets every console line."""
    config = prepared.config
    study, fresh = _open(config, progress)
    _check_cluster(config)
    if config.search.sensitivity.enabled:
        prepared = _with_sensitivity(prepared, study, progress)
    screening = config.search.screen.candidates > 0
    anchors = anchor_trials(config, study, prepared, progress) if fresh and not screening else []
    remote = ray.remote(trial_task).options(**trial_options(config))
    base_ref = ray.put({k: v.detach().cpu() for k, v in prepared.task.model.state_dict().items()})
    reference = architecture_signature(prepared.task.model)
    benches = start_benches(
        config.targets, {t.name: load_latency_cache(study, t, reference) for t in config.targets}
    )
    ray_side = RaySide(remote, base_ref, RemoteMeasure(benches, config.target.name))
    try:
        warm_workers(config, reserved_cpus(config.targets), progress)
        base = measure_base(prepared, study, ray_side, reference, progress)
        recorder = _start_recorder(config, study, base)
        loop, screened = _build_loop(prepared, study, ray_side, base, anchors, recorder, progress)
        try:
            stopped_by = loop.run()
        except BaseException:
            recorder.flush(wait_s=30)  # what the loop recorded before it broke, for the next run
            raise
    finally:
        for bench in {id(b): b for b in benches.values()}.values():
            ray.kill(bench)  # frees the CPUs it reserved on the target
    return _conclude(prepared, study, recorder, base, loop, stopped_by, screened, progress)


def _open(config: Config, progress: Progress) -> tuple[optuna.Study, bool]:
    """The study, with orphans failed and any warm start enqueued; and whether it is new."""
    study = open_study(config)
    fresh = not study.trials  # anchors start new searches only, never a resumed one
    orphans = fail_orphans(study)
    if orphans:
        progress(
            f"resuming {config.name}: trials {orphans} were left running by a stopped driver; re-asking them"
        )
    warmed = warm_start(study, config)
    if warmed:
        progress(
            f"warm start: enqueued the front of study {config.search.warm_start.study!r} "
            f"(its trials {warmed})"
        )
    return study, fresh


def _check_cluster(config: Config) -> None:
    """Attach to Ray, and refuse before any dispatch what would wait forever: a target no node
    has, trial resources no node offers, no room for a trial beside the benches."""
    ensure_ray(config.ray_address)
    for t in config.targets:
        check_placeable("target", t.resources, t.label_selector, who=f" {t.name!r}")
    check_placeable(
        "resources", config.resources.custom, config.resources.label_selector, resource_key="custom"
    )
    check_room_for_trials(config.resources.num_cpus, reserved_cpus(config.targets))


def _start_recorder(config: Config, study: optuna.Study, base: dict[str, float]) -> SearchRecorder:
    """The MLflow parent run, with the sensitivity scan and any trial a dead driver did not record."""
    recorder = SearchRecorder(config)
    recorder.start(base)
    if scan := study.user_attrs.get(SENSITIVITY_ATTR):  # the scan, as a heat map to read
        recorder.log_png(
            "sensitivity.png", sensitivity_figure(scan["accuracy"], scan["base_accuracy"])
        )
    _log_unrecorded(study, recorder, base)
    return recorder


def _build_loop(
    prepared: Prepared,
    study: optuna.Study,
    ray_side: RaySide,
    base: dict[str, float],
    anchors: list[dict[str, Any]],
    recorder: SearchRecorder,
    progress: Progress,
) -> tuple[Loop, ScreenOutcome | None]:
    """The dispatch loop over the screened or anchored study, with the search's listeners."""
    config = prepared.config
    es = config.search.early_stop
    board = start_board(
        _early_latency_bound(config), min(1.0, base["accuracy"] + es.dominance_margin), es.margin
    )
    rules = _rules(config, board)

    def submit(spec: TrialSpec) -> ray.ObjectRef:  # the Ray edge: plain values from here on
        r = ray_side
        return r.remote.remote(
            spec.to_dict(), r.base_ref, measure=r.measure, rules=rules, board=board
        )

    profile, screened = _screen(prepared, study, ray_side, base, progress)
    ctx, floor = SearchContext(config, prepared.space, prepared.discovery, profile), _floor(base)
    if screened is not None:
        picks = ScreenedStudy(
            study, screened.candidates, floor, config.search.trials, base["latency_ms"]
        )
        ask = partial(ask_trial, ctx, picks)
    elif config.search.anchors:
        ask = anchored_ask(ctx, study, anchors, floor, progress)
    else:
        ask = partial(ask_trial, ctx, study)
    loop = search_loop(ask, submit, study, recorder, board, base, floor, progress)
    return loop, screened


def _conclude(
    prepared: Prepared,
    study: optuna.Study,
    recorder: SearchRecorder,
    base: dict[str, float],
    loop: Loop,
    stopped_by: str,
    screened: ScreenOutcome | None,
    progress: Progress,
) -> Outcome:
    """The final front and metrics on the parent run, the front's models registered."""
    config = prepared.config
    table = front_table(study, base)
    hv = hypervolume(points(front(study, base)), base["latency_ms"], _floor(base))
    figure = front_views(study, base, config)
    metrics = {"hypervolume": hv, "front_size": len(table)} | _screen_report(
        screened, study, progress
    )
    unlogged = recorder.finish(table, figure, metrics, stopped_by)
    registered, unregistered = [], {}
    if config.tracking.register and stopped_by != "signal" and not unlogged:
        registered, unregistered = _register(prepared, recorder, table, base, progress)
    return Outcome(
        config.name,
        recorder.parent_id,
        base,
        table,
        loop.counts,
        stopped_by,
        hv,
        loop.results,
        registered,
        unlogged,
        unregistered,
    )


def screen_job(config: Config) -> dict[str, Any]:
    """What every profile and screen batch is told, as plain values (``workers.screen_candidates``
    takes it with the batch's ``candidates`` added)."""
    screen = config.search.screen
    return {
        "task": config.task,
        "task_options": dict(config.task_options),
        "seed": config.search.seed or 0,
        "threads": max(1, int(config.resources.num_cpus)),
        "target": to_plain(config.target),
        "bn_batches": screen.bn_batches,
        "score_batches": screen.score_batches,
        "steps": screen.steps,
        "refit_head": screen.refit_head,
        "timing_rounds": screen.timing_rounds,  # read by screen_task, for the bench
        "lr": config.finetune.lr,  # the short finetune's (steps), the trial's own
        "weight_decay": config.finetune.weight_decay,
        "depth": config.search.space.depth != 0,  # the profile measures each block's damage
    }


def _screen(
    prepared: Prepared,
    study: optuna.Study,
    ray_side: RaySide,
    base: dict[str, float],
    progress: Progress,
) -> tuple[Profile | None, ScreenOutcome | None]:
    """The allocator's profile (granularity allocation) and the screen (search.screen), both on
    Ray workers placed like trials."""
    config, space = prepared.config, prepared.space
    job, base_ref = screen_job(config), ray_side.base_ref
    profile = None
    if space.granularity == "allocation":
        progress(
            f"profiling {len(prepared.discovery.groups)} groups: channel importance on training batches, "
            "cost per channel"
        )
        remote = ray.remote(profile_task).options(**trial_options(config))
        profile = group_profile(remote, job, base_ref, prepared.discovery)
    if not config.search.screen.candidates:
        return profile, None
    remote = ray.remote(screen_task).options(**trial_options(config))
    outcome = run_screen(
        ScreenSetup(
            config,
            study,
            space,
            prepared.discovery,
            profile,
            job,
            lambda j: remote.remote(j, base_ref, measure=ray_side.measure),
            progress,
            adapting(config.search.screen.steps, has_batchnorm(prepared.task.model)),
        )
    )
    st = outcome.stats
    progress(
        f"screened {st['screen_candidates']:.0f} candidates ({st['screen_failed']:.0f} failed), "
        f"{st['screen_s_per_candidate'] * 1000:.0f} ms of worker time each ({stage_shares(st)}); "
        f"finetuning the proxy-best of {config.search.trials} latency bins"
    )
    return outcome.profile, outcome


def _screen_report(
    screened: ScreenOutcome | None, study: optuna.Study, progress: Progress
) -> dict[str, float]:
    """Parent-run metrics: the screen's cost and how well its proxy ranked finetuned accuracy."""
    if screened is None:
        return {}
    quality = proxy_quality(study.get_trials(deepcopy=False))
    if quality:
        tau = quality["proxy_kendall_tau"]
        progress(
            f"proxy vs finetuned accuracy over {quality['proxy_pairs']:.0f} trials: Kendall tau {tau:.2f}, "
            f"Spearman {quality['proxy_spearman']:.2f}"
            + (
                "; the proxy ranks poorly on this task: give finetuned trials more of the budget "
                "(more search.trials, or search.screen.candidates: 0)"
                if tau < 0.2
                else ""
            )
        )
    else:
        progress(
            "proxy vs finetuned accuracy: not measurable yet (it needs 3 finetuned picks whose "
            "proxy scores and accuracies both vary)"
        )
    return screened.stats | quality


def _register(
    prepared: Prepared,
    recorder: SearchRecorder,
    table: list[dict[str, Any]],
    base: dict[str, float],
    progress: Progress,
) -> tuple[list[Registered], dict[int, str]]:
    """The front's models registered, and those that failed (trial -> the error's line)."""
    failed: dict[int, str] = {}

    def report(trial: int, exc: Exception) -> None:
        failed[trial] = one_line(f"{type(exc).__name__}: {exc}")
        progress(f"warning: trial {trial}'s model was not registered: {failed[trial]}")

    try:
        registered = register_front(
            prepared.config, recorder.client, recorder.children, table, prepared.task, base, report
        )
    except Exception as exc:
        if not is_outage(exc):
            raise
        progress(
            f"warning: MLflow became unreachable while registering front models ({exc}); "
            "rerun the search to register them"
        )
        return [], failed
    # Said as it happens: else a user learnt it only when `export --format onnx` found no file.
    if without := [r for r in registered if r.no_onnx]:
        versions = ", ".join(str(r.version) for r in without)
        progress(
            f"note: {plural(len(without), 'front model')} registered without an ONNX export "
            f"(version {versions}): {clipped(without[0].no_onnx, 160)}; each version's tag "
            "onnx_skipped says why; `prunesearch export --format pt2` gives the torch.export archive"
        )
    return registered, failed


def _with_sensitivity(prepared: Prepared, study: optuna.Study, progress: Progress) -> Prepared:
    """Narrow per-unit upper bounds from the scan; seed the first trials of a new study."""
    space, seeds = narrowed(prepared, sensitivity(prepared, study, progress))
    if not study.trials:
        for params in seeds:
            study.enqueue_trial(params, skip_if_exists=True)
    return replace(prepared, space=space)


def trial_options(config: Config) -> dict[str, Any]:
    """What each trial asks Ray for: CPUs/GPUs/memory, and trainer-only resources or labels."""
    r = config.resources
    options: dict[str, Any] = {
        "num_cpus": r.num_cpus,
        "num_gpus": r.num_gpus,
        "max_retries": r.max_retries,
    }
    if r.memory_mb:
        options["memory"] = r.memory_mb * 2**20
    if r.custom:
        options["resources"] = dict(r.custom)
    if r.label_selector:
        options["label_selector"] = dict(r.label_selector)
    return options


def _log_unrecorded(study: optuna.Study, recorder: SearchRecorder, base: dict[str, float]) -> None:
    """Finished trials with no MLflow run: orphans failed just now, and trials a dead driver told
    the study but had not yet recorded (it records after refilling the cluster). Each gets its
    run, rebuilt from what the study holds; only the weights are gone."""
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=done):
        if t.number not in recorder.children:
            recorder.log_trial(
                result_of(t),
                base["latency_ms"],
                t.state.name,
                recovered=not str(t.user_attrs.get("reason", "")).startswith("orphaned"),
            )


def _rules(config: Config, board: Any) -> RemoteRules | ConstraintRules:
    es = config.search.early_stop
    if es.reject_dominated or es.stop_hopeless:
        return RemoteRules(board, config.finetune.epochs, es.reject_dominated, es.stop_hopeless)
    return ConstraintRules(_early_latency_bound(config))


def _early_latency_bound(config: Config) -> float | None:
    """The latency bound workers apply before finetuning (None: judged only after, by the study)."""
    return config.constraints.max_latency_ms if config.search.early_stop.reject_infeasible else None


def _floor(base: dict[str, float]) -> float:
    # Hypervolume's accuracy reference: 10 points under the base model (stated in README).
    return max(0.0, base["accuracy"] - 0.10)
