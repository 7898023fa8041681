"""The search loop: ask, dispatch to Ray, tell as each trial finishes, record, repeat.

The orchestrator is the single writer of the study and of MLflow. It keeps ``concurrency``
trials in flight and asks for a new one the moment any finishes (``ray.wait``), never waiting
for a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
import ray
from optuna.trial import TrialState

from search_space import (
    Discovery,
    Profile,
    PruningPlan,
    SearchSpace,
    anchor_params,
    architecture_signature,
    check_patterns,
    discover,
    narrow_space,
    units_for,
)
from workers import COMPLETE, FAILED, ConstraintRules, Task, TrialResult, build_task

from ._cluster import check_placeable, check_room_for_trials, ensure_ray
from ._config import Config
from ._loop import Loop
from ._pareto import front, front_table, hypervolume, points
from ._plots import sensitivity_figure
from ._registry import Registered, register_front
from ._report import front_views
from ._screen import (
    ScreenedStudy,
    ScreenOutcome,
    ScreenSetup,
    group_profile,
    proxy_quality,
    run_screen,
)
from ._sensitivity import STUDY_ATTR as SENSITIVITY_ATTR
from ._sensitivity import narrowed, sensitivity
from ._services import (
    RemoteMeasure,
    RemoteRules,
    bench_cpus,
    placements,
    profile_task,
    screen_task,
    start_benches,
    start_board,
    trial_task,
)
from ._study import (
    fail_orphans,
    load_calibrations,
    load_latency_cache,
    open_study,
    save_calibrations,
    save_latency,
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
    config = prepared.config
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
    ensure_ray(config.ray_address)
    for t in config.targets:  # before any dispatch: a target no node has would wait forever
        check_placeable("target", t.resources, t.label_selector, who=f" {t.name!r}")
    check_placeable(
        "resources", config.resources.custom, config.resources.label_selector, resource_key="custom"
    )
    check_room_for_trials(
        config.resources.num_cpus, sum(bench_cpus(group) for group in placements(config.targets))
    )
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
    measure = RemoteMeasure(benches, config.target.name)
    try:
        calibration = _calibrate(prepared, study, measure, reference, progress)
        base = _measure_base(remote, prepared, study, base_ref, measure) | calibration
        progress(
            f"base model: accuracy {base['accuracy']:.4f}, latency {base['latency_ms']:.3f} ms "
            f"on {config.target.name}, {base['macs'] / 1e6:.2f} M MACs, {base['params'] / 1e3:.1f} k params"
        )
        es = config.search.early_stop
        board = start_board(
            _early_latency_bound(config),
            min(1.0, base["accuracy"] + es.dominance_margin),
            es.margin,
        )
        recorder = SearchRecorder(config)
        recorder.start(base)
        if scan := study.user_attrs.get(SENSITIVITY_ATTR):  # the scan, as a heat map to read
            recorder.log_png(
                "sensitivity.png", sensitivity_figure(scan["accuracy"], scan["base_accuracy"])
            )
        _log_unrecorded(study, recorder, base)
        rules = _rules(config, board)

        def submit(spec: dict[str, Any]) -> ray.ObjectRef:
            return remote.remote(spec, base_ref, measure=measure, rules=rules, board=board)

        ctx = SearchContext(
            config,
            study,
            prepared.space,
            prepared.discovery,
            submit,
            recorder,
            board,
            base,
            _floor(base),
        )
        ctx.profile, screened = _screen(prepared, study, base_ref, measure, base, progress)
        if screened is not None:
            ctx.study = ScreenedStudy(
                study, screened.candidates, ctx.floor, config.search.trials, base["latency_ms"]
            )
        elif config.search.anchors:
            ctx.study = AnchoredStudy(study, anchors, ctx, progress)
        loop = Loop(ctx, lambda number, plan: _spec(config, number, plan), progress)
        try:
            stopped_by = loop.run()
        except BaseException:
            recorder.flush(wait_s=30)  # what the loop recorded before it broke, for the next run
            raise
    finally:
        for bench in {id(b): b for b in benches.values()}.values():
            ray.kill(bench)  # frees the CPUs it reserved on the target
    table = front_table(study, base)
    hv = hypervolume(points(front(study)), base["latency_ms"], _floor(base))
    figure = front_views(study, base, config)
    metrics = {"hypervolume": hv, "front_size": len(table)} | _screen_report(
        screened, study, progress
    )
    unlogged = recorder.finish(table, figure, metrics, stopped_by)
    registered = []
    if config.tracking.register and stopped_by != "signal" and not unlogged:
        registered = _register(prepared, recorder, table, base, progress)
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
    )


def _screen(
    prepared: Prepared,
    study: optuna.Study,
    base_ref: Any,
    measure: RemoteMeasure,
    base: dict[str, float],
    progress: Progress,
) -> tuple[Profile | None, ScreenOutcome | None]:
    """The allocator's profile (granularity allocation) and the screen (search.screen), both on
    Ray workers placed like trials."""
    config, space = prepared.config, prepared.space
    screen = config.search.screen
    job = {
        "task": config.task,
        "task_options": dict(config.task_options),
        "seed": config.search.seed or 0,
        "threads": max(1, int(config.resources.num_cpus)),
        "target": config.to_dict()["target"],
        "bn_batches": screen.bn_batches,
        "score_batches": screen.score_batches,
    }
    profile = None
    if space.granularity == "allocation":
        progress(
            f"profiling {len(prepared.discovery.groups)} groups: channel importance on training batches, "
            "cost per channel"
        )
        remote = ray.remote(profile_task).options(**trial_options(config))
        profile = group_profile(remote, job, base_ref, prepared.discovery)
    if not screen.candidates:
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
            lambda j: remote.remote(j, base_ref, measure=measure),
            progress,
        )
    )
    st = outcome.stats
    progress(
        f"screened {st['screen_candidates']:.0f} candidates ({st['screen_failed']:.0f} failed), "
        f"{st['screen_s_per_candidate'] * 1000:.0f} ms of worker time each; finetuning the proxy-best "
        f"of {config.search.trials} latency bins"
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
) -> list[Registered]:
    try:
        return register_front(
            prepared.config, recorder.client, recorder.children, table, prepared.task, base
        )
    except Exception as exc:
        if not is_outage(exc):
            raise
        progress(
            f"warning: MLflow became unreachable while registering front models ({exc}); "
            "rerun the search to register them"
        )
        return []


def _with_sensitivity(prepared: Prepared, study: optuna.Study, progress: Progress) -> Prepared:
    """Narrow per-unit upper bounds from the scan; seed the first trials of a new study."""
    space, seeds = narrowed(prepared, sensitivity(prepared, study, progress))
    if not study.trials:
        for params in seeds:
            study.enqueue_trial(params, skip_if_exists=True)
    return replace(prepared, space=space)


def anchor_trials(
    config: Config, study: optuna.Study, prepared: Prepared, progress: Progress
) -> list[dict[str, Any]]:
    """The anchor trials' parameters (``search.anchors``) in the space as searched (narrowed by a
    sensitivity scan), after whatever is already enqueued (warm start, sensitivity seeds): never
    past the trial budget, never a set of ratios already queued."""
    count = min(config.search.anchors, config.search.trials - len(study.trials))
    if count <= 0:
        return []
    taken = [_ratios(t) for t in study.trials]
    anchors = [
        p
        for p in anchor_params(prepared.space, prepared.discovery, count)
        if _ratios_of(p) not in taken
    ]
    if anchors:
        progress(
            f"anchors: {len(anchors)} first trial(s) with every unit at one ratio "
            f"({', '.join(f'{max(_ratios_of(a).values()):g}' for a in anchors)})"
        )
    return anchors


def _ratios(t: optuna.trial.FrozenTrial) -> dict[str, float]:
    # An enqueued trial holds its parameters as fixed_params until it is asked.
    return _ratios_of(t.params or t.system_attrs.get("fixed_params") or {})


def _ratios_of(params: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in params.items() if k.startswith("ratio/")}


class AnchoredStudy:
    """The study as the loop sees it: each ask first enqueues the next anchor trial, once no other
    enqueued trial waits (warm-start and sensitivity seeds go first); once no anchor is left to
    ask, it bounds the space the loop samples from by what the anchors found (``cap``).

    One at a time, at ask time, rather than all up front: a search stopped early (a deadline, a
    signal, a failed write) leaves no anchor waiting in the study, and its resumption samples.
    Everything else is the study's own.
    """

    def __init__(
        self,
        study: optuna.Study,
        anchors: list[dict[str, Any]],
        ctx: Any = None,
        progress: Progress = print,
    ) -> None:
        self._study, self._ctx, self._progress = study, ctx, progress
        self._pending = list(enumerate(anchors))
        self._total = len(anchors)
        self._space = ctx.space if ctx is not None else None  # the space before any cap
        self._cap: float | None = None

    def ask(self, *args: Any, **kwargs: Any) -> optuna.Trial:
        if self._pending and not self._study.get_trials(
            deepcopy=False, states=(TrialState.WAITING,)
        ):
            i, params = self._pending.pop(0)
            level = max(
                (float(v) for k, v in params.items() if k.startswith("ratio/")), default=None
            )
            attrs = {"anchor": f"{i + 1}/{self._total}"} | (
                {} if level is None else {"anchor_level": level}
            )
            self._study.enqueue_trial(params, user_attrs=attrs)
        elif not self._pending and self._ctx is not None:
            self._bound()
        return self._study.ask(*args, **kwargs)

    def _bound(self) -> None:
        """Cap every unit's sampled ratio at the lowest anchor level whose model fell under the
        front's accuracy floor (base - 0.10, the hypervolume reference): with every unit there the
        model already lost too much, and a sampled plan with some units above it mostly does too.
        Recomputed from the study at each ask, so a resumed search keeps the cap."""
        done = self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        bad = [
            float(t.user_attrs["anchor_level"])
            for t in done
            if "anchor_level" in t.user_attrs
            and t.user_attrs.get("status") == COMPLETE
            and t.values[0] < self._ctx.floor
        ]
        cap = min(bad, default=None)
        if cap is None or cap == self._cap:
            return
        self._cap = cap
        units = units_for(self._space, self._ctx.discovery)
        self._ctx.space = narrow_space(self._space, {u: cap for u in units})
        self._progress(
            f"anchors: every unit at ratio {cap:g} fell under accuracy {self._ctx.floor:.4f}; "
            f"sampling per-unit ratios up to {cap:g} from now on"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


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


def _calibrate(
    prepared: Prepared,
    study: optuna.Study,
    measure: RemoteMeasure,
    reference: str,
    progress: Callable[[str], None],
) -> dict[str, float]:
    """Hand every bench the base model (trials and screening are timed against it, pair by pair)
    and its calibrated latency: kept with the study, so a resumed search stays on one scale."""
    targets = prepared.config.targets
    stored = load_calibrations(study, targets, reference)
    if any(t.paired and t.name not in stored for t in targets):
        progress("calibrating: the base model timed against itself on each target")
    figures = measure.set_reference(
        prepared.task.model, prepared.task.example_inputs, stored, reference
    )
    save_calibrations(study, targets, reference, figures)
    primary = prepared.config.target
    if not primary.paired:
        return {}
    cal = figures[primary.name]
    progress(
        f"latency is paired: each candidate / the base model, run by run, x the base's "
        f"{cal['ms']:.3f} ms on {primary.name} ({'kept from' if primary.name in stored else 'measured for'} "
        f"this study; noise floor {100 * cal['noise']:.1f} %)"
    )
    return {"calibration_ms": float(cal["ms"]), "calibration_noise": float(cal["noise"])}


def _measure_base(
    remote, prepared: Prepared, study: optuna.Study, base_ref, measure: RemoteMeasure
) -> dict[str, float]:
    """The unpruned model measured exactly like a trial: same worker path, same target, and kept in
    the latency cache like a trial's measurement (a trial that prunes nothing reuses it)."""
    zero = PruningPlan(ratios={}, units={})
    spec = _spec(prepared.config, -1, zero) | {"finetune": {"epochs": 0}, "keep_model": False}
    result: TrialResult = ray.get(
        remote.remote(spec, base_ref, measure=measure, rules=ConstraintRules(None))
    )
    if result.status != COMPLETE:
        raise RuntimeError(f"measuring the base model failed: {result.reason}")
    save_latency(study, prepared.config, result)
    return {
        "accuracy": result.accuracy,
        "latency_ms": result.latency["median_ms"],
        "macs": float(result.macs),
        "params": float(result.params),
        "size_mb": result.size_mb,
    }


@dataclass
class SearchContext:
    """What the loop needs from the search: the study, the space, and how to submit and record."""

    config: Config
    study: optuna.Study | AnchoredStudy
    space: SearchSpace
    discovery: Discovery
    submit: Callable[[dict[str, Any]], ray.ObjectRef]
    recorder: SearchRecorder
    board: Any
    base: dict[str, float]
    floor: float
    profile: Profile | None = None  # the allocator's table (granularity allocation)


def _log_unrecorded(study: optuna.Study, recorder: SearchRecorder, base: dict[str, float]) -> None:
    """Finished trials with no MLflow run: orphans failed just now, and trials a dead driver told
    the study but had not yet recorded (it records after refilling the cluster). Each gets its
    run, rebuilt from what the study holds; only the weights are gone."""
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=done):
        if t.number not in recorder.children:
            recorder.log_trial(
                _result_of(t),
                base["latency_ms"],
                t.state.name,
                recovered=not str(t.user_attrs.get("reason", "")).startswith("orphaned"),
            )


def _result_of(t: optuna.trial.FrozenTrial) -> TrialResult:
    a = t.user_attrs
    epochs = list(a.get("epoch_accuracy") or [])
    accuracy = t.values[0] if t.values else (epochs[-1] if epochs else None)
    return TrialResult(
        number=t.number,
        status=a.get("status") or FAILED,
        plan=a.get("plan", _EMPTY_PLAN),
        accuracy=accuracy,
        latency=a.get("latency") or None,
        macs=a.get("macs"),
        params=a.get("params"),
        size_mb=a.get("size_mb"),
        signature=a.get("signature"),
        epoch_accuracy=epochs,
        seconds=dict(a.get("seconds") or {}),
        reason=a.get("reason"),
        recovery=dict(a.get("recovery") or {}),
        train_epochs=a.get("train_epochs"),
    )


_EMPTY_PLAN = PruningPlan(ratios={}, units={}).to_dict()


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


def _spec(config: Config, number: int, plan: PruningPlan) -> dict[str, Any]:
    """A trial's whole input, as plain values: what travels to the worker."""
    return {
        "number": number,
        "plan": plan.to_dict(),
        "task": config.task,
        "task_options": dict(config.task_options),
        "finetune": {
            "epochs": config.finetune.epochs,
            "lr": config.finetune.lr,
            "weight_decay": config.finetune.weight_decay,
        },
        "calibration_batches": config.finetune.calibration_batches,
        "target": config.to_dict()["target"],
        "seed": (config.search.seed or 0) + max(number, 0),
        "threads": max(1, int(config.resources.num_cpus)),
        "device": config.device,
        "max_latency_ms": config.constraints.max_latency_ms,
    }
