"""Building a trial from the study: ask, sample its plan and recovery, write its spec.

Anchor trials (``search.anchors``) go first, one per ask, and then cap the space the sampler
draws from (``anchored_ask``); ``ask_trial`` builds each new trial the dispatch loop asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import optuna
from optuna.trial import Trial, TrialState

from search_space import (
    Discovery,
    Profile,
    PruningPlan,
    Recovery,
    SearchSpace,
    anchor_params,
    narrow_space,
    suggest_plan,
    suggest_recovery,
    units_for,
)
from workers import Target, TrialStatus

from ._config import Config, FinetuneConfig
from ._schema import to_plain

if TYPE_CHECKING:
    from ._search import Prepared

Progress = Callable[[str], None]


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
            f"({', '.join(f'{_level(a):g}' for a in anchors)})"
        )
    return anchors


def _ratios(t: optuna.trial.FrozenTrial) -> dict[str, float]:
    # An enqueued trial holds its parameters as fixed_params until it is asked.
    return _ratios_of(t.params or t.system_attrs.get("fixed_params") or {})


def _ratios_of(params: dict[str, Any]) -> dict[str, float]:
    """What sets a plan's ratios: per-unit ratios, or the allocator's level, blend and depth."""
    return {k: round(float(v), 6) for k, v in params.items() if k.startswith(("ratio/", "alloc/"))}


def _level(params: dict[str, Any]) -> float:
    """The one ratio of an anchor: the allocator's level, or its units' (all alike)."""
    if "alloc/level" in params:
        return float(params["alloc/level"])
    return max(v for k, v in _ratios_of(params).items() if k.startswith("ratio/"))


def queue_anchor(study: optuna.Study, anchors: Sequence[Mapping[str, Any]]) -> bool:
    """Enqueue the first of ``anchors`` the study was not given yet (its trials carry ``anchor``:
    "i/n"), unless another enqueued trial waits (warm-start and sensitivity seeds go first).
    Returns whether an anchor was left to ask; False once every one was (``anchor_cap`` then)."""
    if not anchors:
        return False
    given = {t.user_attrs.get("anchor") for t in study.get_trials(deepcopy=False)}
    left = [(f"{i + 1}/{len(anchors)}", p) for i, p in enumerate(anchors)]
    left = [(label, params) for label, params in left if label not in given]
    if not left:
        return False
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        label, params = left[0]
        ratios = [float(v) for k, v in params.items() if k.startswith("ratio/")]
        attrs = {"anchor": label} | ({"anchor_level": max(ratios)} if ratios else {})
        study.enqueue_trial(dict(params), user_attrs=attrs)
    return True


def anchor_cap(study: optuna.Study, floor: float) -> float | None:
    """The lowest anchor level whose model fell under the front's accuracy ``floor`` (base - 0.10,
    the hypervolume reference), or None: with every unit there the model already lost too much,
    and a sampled plan with some units above it mostly does too. Read from the study, so a
    resumed search keeps its cap."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    bad = [
        float(t.user_attrs["anchor_level"])
        for t in done
        if "anchor_level" in t.user_attrs
        and t.user_attrs.get("status") == TrialStatus.COMPLETE
        and t.values[0] < floor
    ]
    return min(bad, default=None)


def capped_space(space: SearchSpace, discovery: Discovery, cap: float) -> SearchSpace:
    """``space`` with every unit's ratio capped at ``cap`` (the user's own overrides still win)."""
    return narrow_space(space, dict.fromkeys(units_for(space, discovery), cap))


def anchored_ask(
    ctx: SearchContext,
    study: optuna.Study,
    anchors: Sequence[Mapping[str, Any]],
    floor: float,
    progress: Progress = print,
) -> Callable[[], tuple[Trial, TrialSpec]]:
    """The dispatch loop's ``ask`` for a search with ``search.anchors``: each ask first enqueues
    the next anchor, once no other enqueued trial waits (warm-start and sensitivity seeds go
    first); once every anchor was asked, trials sample from the space under ``anchor_cap``.

    One anchor at a time, at ask time, rather than all up front: a search stopped early (a
    deadline, a signal, a failed write) leaves no anchor waiting in the study, and its
    resumption samples."""
    capped: dict[float, SearchSpace] = {}  # each cap's space, said once on the console

    def ask() -> tuple[Trial, TrialSpec]:
        cap = None if queue_anchor(study, anchors) else anchor_cap(study, floor)
        if cap is None:
            return ask_trial(ctx, study)
        if cap not in capped:
            capped[cap] = capped_space(ctx.space, ctx.discovery, cap)
            progress(
                f"anchors: every unit at ratio {cap:g} fell under accuracy {floor:.4f}; "
                f"sampling per-unit ratios up to {cap:g} from now on"
            )
        return ask_trial(ctx, study, capped[cap])

    return ask


class Asks(Protocol):
    """What a trial is asked from: the study, or one that picks its next trial first (ScreenedStudy)."""

    def ask(self) -> Trial: ...


@dataclass(frozen=True)
class SearchContext:
    """What every trial of a search is built with: the config, the space as prepared (narrowed by
    a sensitivity scan), the model's groups, and the allocator's table (granularity allocation)."""

    config: Config
    space: SearchSpace
    discovery: Discovery
    profile: Profile | None = None


def ask_trial(
    ctx: SearchContext, study: Asks, space: SearchSpace | None = None
) -> tuple[Trial, TrialSpec]:
    """A new trial from ``study``, sampled in ``space`` (default: ``ctx.space``), its plan kept as
    a user attribute, and its spec."""
    trial = study.ask()
    space = space or ctx.space
    plan = suggest_plan(trial, space, ctx.discovery, ctx.profile)
    if fixed := trial.user_attrs.get("plan"):  # a screened pick: finetune exactly the plan screened
        plan = PruningPlan.from_dict(fixed)
    recovery = suggest_recovery(
        trial, space.recovery
    )  # how it recovers (search_space/_recovery.py)
    trial.set_user_attr("plan", plan.to_dict())
    return trial, trial_spec(ctx.config, trial.number, plan, recovery)


@dataclass(frozen=True)
class TrialSpec:
    """One trial's whole input, typed: built once (``trial_spec``) and turned into plain values
    only where it crosses to a Ray worker (``to_dict``)."""

    number: int
    plan: PruningPlan
    task: str
    task_options: Mapping[str, Any]
    finetune: FinetuneConfig
    target: Target
    seed: int
    threads: int  # CPU intra-op threads on the worker
    device: str
    max_latency_ms: float | None = None  # the bound a worker may reject a plan by before finetuning
    recovery: Recovery | None = None  # None: the worker's default (oneshot)
    keep_model: bool = True  # send the pruned weights back (MLflow keeps them)

    def to_dict(self) -> dict[str, Any]:
        """The plain values ``workers.run_trial`` reads."""
        ft = self.finetune
        out: dict[str, Any] = {
            "number": self.number,
            "plan": self.plan.to_dict(),
            "task": self.task,
            "task_options": dict(self.task_options),
            "finetune": {"epochs": ft.epochs, "lr": ft.lr, "weight_decay": ft.weight_decay},
            "calibration_batches": ft.calibration_batches,
            "target": to_plain(self.target),
            "seed": self.seed,
            "threads": self.threads,
            "device": self.device,
            "max_latency_ms": self.max_latency_ms,
        }
        if self.recovery is not None:
            out["recovery"] = self.recovery.to_dict()
        if not self.keep_model:
            out["keep_model"] = False
        return out


def trial_spec(
    config: Config, number: int, plan: PruningPlan, recovery: Recovery | None = None
) -> TrialSpec:
    """Trial ``number``'s spec under ``config``: its plan and recovery, and what every trial of the
    search shares (task, finetuning, target, device); seeded per trial."""
    return TrialSpec(
        number=number,
        plan=plan,
        task=config.task,
        task_options=dict(config.task_options),
        finetune=config.finetune,
        target=config.target,
        seed=(config.search.seed or 0) + max(number, 0),
        threads=max(1, int(config.resources.num_cpus)),
        device=config.device,
        max_latency_ms=config.constraints.max_latency_ms,
        recovery=recovery,
    )
