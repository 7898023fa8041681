"""The quality benchmark's arms and run settings: what each arm of ``benchmarks.quality`` is
(its sampler, space, screen and anchors), and the modes (tiny, quick, full) it runs in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._results import SMOKE_SCREEN, SMOKE_TIMING

MAX_RATIO = 0.8  # every arm's ratios lie in [0, MAX_RATIO]
FLOOR = 0.10  # hypervolume's accuracy reference: base accuracy minus this
DROP = 0.01  # "within one point": accuracy >= base - DROP
RULES_OFF = {"reject_infeasible": False, "reject_dominated": False, "stop_hopeless": False}
# Each task's target: digits at batch 1 (per-op overhead dominates), the others at batch 16
# (compute dominates). The search times with a cheap target; the score re-times (see remeasure).
TASKS = {"digits": 1, "shifted_digits": 16, "colour_shapes": 16}
OURS = "default"  # the arm every other is judged against


def batch_of(task: str) -> int:
    """The timing batch of a task: a built-in's own, 16 for any other (a ``module:build`` task,
    which is how a model family outside the repository is benchmarked with the same arms)."""
    return TASKS.get(task, 16)


# The Arm fields that are search.screen settings of the same name.
SCREEN_FIELDS = (
    "table",
    "uniform_share",
    "layer_share",
    "subset_share",
    "time_share",
    "steps",
    "refit_head",
    "timing_rounds",
)


@dataclass(frozen=True)
class Arm:
    label: str
    key: str
    sampler: str
    space: dict[str, Any]
    sweep: bool = False  # trials enqueued at evenly spaced uniform ratios
    anchors: int | None = None  # search.anchors; None: the product's default
    screen: int | None = None  # search.screen.candidates; None: the product's default
    baseline: bool = True  # judged against the default (an ablation of prunesearch is not)
    table: bool | None = None  # search.screen.table; None: the product's default
    uniform_share: float | None = None  # search.screen.uniform_share; None: the default
    layer_share: float | None = None  # search.screen.layer_share; None: the default
    subset_share: float | None = None  # search.screen.subset_share; None: the default
    time_share: float | None = None  # search.screen.time_share; None: the default
    steps: int | None = None  # search.screen.steps; None: the default
    refit_head: bool | None = None  # search.screen.refit_head; None: the default
    timing_rounds: int | None = None  # search.screen.timing_rounds; None: the default

    @property
    def screened(self) -> bool:
        return self.screen != 0


SEARCH_SPACE: dict[str, Any] = {"ratio": [0.0, MAX_RATIO]}  # the rest: prunesearch's defaults
LAYER_SPACE: dict[str, Any] = {"granularity": "layer", "ratio": [0.0, MAX_RATIO]}
SWEEP_SPACE: dict[str, Any] = {
    "granularity": "uniform",
    "ratio": [0.0, MAX_RATIO],
    "step": 0.005,
    "criteria": ["l2"],
    "round_to": [1],
}
UNIFORM_SCREEN_SPACE: dict[str, Any] = {
    "granularity": "uniform",
    "ratio": [0.0, MAX_RATIO],
    "step": 0.01,
}
ARMS = (
    Arm("prunesearch (default)", OURS, "tpe", SEARCH_SPACE),
    Arm("random search", "random", "random", LAYER_SPACE, anchors=0, screen=0),
    Arm("uniform (TP default)", "uniform", "random", SWEEP_SPACE, sweep=True, anchors=0, screen=0),
    Arm(
        "TP global pruning",
        "global",
        "random",
        {**SWEEP_SPACE, "global_pruning": [True]},
        sweep=True,
        anchors=0,
        screen=0,
    ),
    Arm("uniform + screen", "uniform-screen", "tpe", UNIFORM_SCREEN_SPACE, anchors=0),
)
# Arms by key (--arms default,table,no-table,...), not baselines: the default with the damage
# table on, and with it off (the allocator on first-order Taylor importances), whatever the
# product's default is.
TABLE_ARM = Arm(
    "prunesearch + damage table", "table", "tpe", SEARCH_SPACE, baseline=False, table=True
)
NO_TABLE_ARM = Arm(
    "prunesearch, Taylor importance (no damage table)",
    "no-table",
    "tpe",
    SEARCH_SPACE,
    baseline=False,
    table=False,
)
# The default with residual blocks droppable whole (search.space.depth null: any of them), and
# without (depth 0: channels only), whatever the product's default is.
DEPTH_ARM = Arm(
    "prunesearch + depth (blocks dropped)",
    "depth",
    "tpe",
    {**SEARCH_SPACE, "depth": None},
    baseline=False,
)
NO_DEPTH_ARM = Arm(
    "prunesearch, channels only (depth 0)",
    "no-depth",
    "tpe",
    {**SEARCH_SPACE, "depth": 0},
    baseline=False,
)
# The default with half its screen held to uniform plans (their level, criterion and rounding
# sampled), and with none beyond the seeds, whatever the product's default is.
SPLIT_ARM = Arm(
    "prunesearch, half the screen uniform",
    "split",
    "tpe",
    SEARCH_SPACE,
    baseline=False,
    uniform_share=0.5,
)
NO_SPLIT_ARM = Arm(
    "prunesearch, uniform seeds only",
    "no-split",
    "tpe",
    SEARCH_SPACE,
    baseline=False,
    uniform_share=0.0,
)


def _share_arms(what: str, key: str, field: str, pcts: tuple[int, ...]) -> tuple[Arm, ...]:
    """The default with ``field`` (a screen share) at each of ``pcts`` per cent."""
    return tuple(
        Arm(
            f"prunesearch, {pct} % of the screen {what}",
            f"{key}-{pct}",
            "tpe",
            SEARCH_SPACE,
            baseline=False,
            **{field: pct / 100},
        )
        for pct in pcts
    )


# The share itself, a quarter and three quarters: where between the two the default should sit.
SHARE_ARMS = _share_arms("uniform", "split", "uniform_share", (25, 75))
# The default with a share of its screen sampled per layer (random per-layer plans ranked by
# the proxy made 1.08-1.11x on shifted_digits' ceiling pools where the search made 1.00-1.04x).
LAYER_SHARE_ARMS = _share_arms("per layer", "layer", "layer_share", (25, 45))
# The default with a share of its screen sampling which groups are pruned at all (on mixed_task,
# plans that pruned 3 of 6 groups and left the trunk whole made most of the front: RESULTS.md,
# quality-mixed-old-r1).
SUBSET_SHARE_ARMS = _share_arms("over a sampled subset of groups", "subset", "subset_share", (25,))
# The default with only this share of its screen's second half timed (the rest: the cost model).
TIME_SHARE_ARMS = _share_arms("timed after the refit", "time", "time_share", (0, 100))
# The default with a short finetune before the proxy scores (search.screen.steps), and without.
STEPS_ARMS = tuple(
    Arm(
        f"prunesearch, {k} finetune steps before scoring",
        f"steps-{k}",
        "tpe",
        SEARCH_SPACE,
        baseline=False,
        steps=k,
    )
    for k in (0, 4, 8)
)
# The default scoring through the re-solved output layer (search.screen.refit_head), and not.
REFIT_ARMS = tuple(
    Arm(
        f"prunesearch, output layer {'re-solved' if on else 'kept'} in the proxy",
        f"refit-{'on' if on else 'off'}",
        "tpe",
        SEARCH_SPACE,
        baseline=False,
        refit_head=on,
    )
    for on in (True, False)
)
# The default with 6 rounds of the screen's short timing before its stop rule looks (the
# default before 2026-12-05) instead of 2.
ROUNDS_ARMS = (
    Arm(
        "prunesearch, 6 timing rounds a candidate",
        "rounds-6",
        "tpe",
        SEARCH_SPACE,
        baseline=False,
        timing_rounds=6,
    ),
)
# The default's criteria with taylor among them: its gradients cost a screen batch one
# calibration since 2026-12-05 (workers.BaseGradients), not one per candidate.
TAYLOR_ARMS = (
    Arm(
        "prunesearch, taylor among the criteria",
        "taylor",
        "tpe",
        {**SEARCH_SPACE, "criteria": ["l1", "l2", "bn_scale", "lamp", "taylor"]},
        baseline=False,
    ),
)
# --ablation: the previous default (per-layer TPE after 4 uniform anchors, no screen).
ABLATION_ARM = Arm(
    "per-layer TPE + anchors (no screen)", "tpe-layer", "tpe", LAYER_SPACE, screen=0, baseline=False
)
# The default with plans rounded to 1 channel only (search.space.round_to [1]): the default
# space's round_to 8 half left out, to read what that half adds.
ROUND_ARMS = (
    Arm(
        "prunesearch, round_to 1 only",
        "round-1",
        "tpe",
        {**SEARCH_SPACE, "round_to": [1]},
        baseline=False,
    ),
)
KNOWN_ARMS = (
    *ARMS,
    *ROUND_ARMS,
    ABLATION_ARM,
    TABLE_ARM,
    NO_TABLE_ARM,
    DEPTH_ARM,
    NO_DEPTH_ARM,
    SPLIT_ARM,
    NO_SPLIT_ARM,
    *SHARE_ARMS,
    *LAYER_SHARE_ARMS,
    *SUBSET_SHARE_ARMS,
    *TIME_SHARE_ARMS,
    *STEPS_ARMS,
    *REFIT_ARMS,
    *ROUNDS_ARMS,
    *TAYLOR_ARMS,
)  # what --arms may name


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    budgets: tuple[
        int, ...
    ]  # the last is the run's length; each earlier one divides it by a power of 2
    epochs: int
    arms: tuple[Arm, ...] = ARMS
    passes: int = 3  # paired timing passes per model when re-measuring
    screen: int | None = None  # candidates of the screened arms; None: the product's default
    smoke: bool = False  # time to the smoke test's looser precision (SMOKE_TIMING)
    matched: bool = True  # False: no compute-matched extra trials (a finetune-matched run only)
    # True: seed k also trains the task's base model and splits its data with seed k (the task
    # option ``seed``), so seeds differ in the model pruned, not only in the search's draws.
    vary_base: bool = False

    def task_options(self, seed: int) -> dict[str, int]:
        return {"seed": seed} if self.vary_base else {}

    @property
    def timing(self) -> dict[str, float]:
        return dict(SMOKE_TIMING) if self.smoke else {}

    @property
    def trials(self) -> int:
        return self.budgets[-1]


MODES = {
    # The smoke test: every arm and every table, at a size where the screen (and so the
    # compute-matched extra trials it buys the baselines) stays small.
    "tiny": Settings(("digits",), (0,), (1, 2), 1, passes=2, screen=SMOKE_SCREEN, smoke=True),
    "quick": Settings(("shifted_digits",), (0, 1, 2), (6, 12), 1),
    "full": Settings(tuple(TASKS), (0, 1, 2, 3, 4), (6, 12, 24), 1),
}
