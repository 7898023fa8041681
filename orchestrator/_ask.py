"""Building a trial from the study: ask, sample its plan and recovery, write its spec.

Anchor trials (``search.anchors``) go first, one per ask, and then cap the space the sampler
draws from; ``ask_trial`` is what the dispatch loop calls for each new trial.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
            and t.user_attrs.get("status") == TrialStatus.COMPLETE
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


@dataclass
class SearchContext:
    """What asking for a trial needs: the study (anchored or screened) and the space it samples
    from (an anchored study narrows it once its anchors are told)."""

    config: Config
    study: Any  # the study, or the AnchoredStudy / ScreenedStudy that picks its next trials
    space: SearchSpace
    discovery: Discovery
    floor: float  # the front's accuracy floor: anchors under it cap the space
    profile: Profile | None = None  # the allocator's table (granularity allocation)


def ask_trial(ctx: SearchContext) -> tuple[Trial, TrialSpec]:
    """A new trial from the study, its plan kept as a user attribute, and its spec."""
    trial = ctx.study.ask()
    plan = suggest_plan(trial, ctx.space, ctx.discovery, ctx.profile)
    if fixed := trial.user_attrs.get("plan"):  # a screened pick: finetune exactly the plan screened
        plan = PruningPlan.from_dict(fixed)
    recovery = suggest_recovery(
        trial, ctx.space.recovery
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
