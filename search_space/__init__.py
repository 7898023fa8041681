"""What can be pruned and how a choice is written down. Pure: no Ray, no MLflow."""

from __future__ import annotations

from ._allocation import GroupProfile, LayerCost, Profile, allocate, fit_costs
from ._arch import Setup, flatten, structural_train_mode
from ._discovery import (
    Discovery,
    DiscoveryError,
    Excluded,
    PrunableGroup,
    check_patterns,
    discover,
    find_output_layers,
)
from ._plan import PruningPlan
from ._recovery import METHODS, SPARSE_PRUNERS, Recovery, RecoverySpace, suggest_recovery
from ._signature import architecture_signature
from ._space import (
    CRITERIA,
    GRANULARITIES,
    SearchSpace,
    anchor_params,
    narrow_space,
    seed_params,
    suggest_plan,
    uniform_plan,
    units_for,
)

__all__ = [
    "Setup",
    "flatten",
    "structural_train_mode",
    "CRITERIA",
    "GRANULARITIES",
    "METHODS",
    "SPARSE_PRUNERS",
    "Discovery",
    "DiscoveryError",
    "check_patterns",
    "Excluded",
    "GroupProfile",
    "LayerCost",
    "PrunableGroup",
    "Profile",
    "PruningPlan",
    "Recovery",
    "RecoverySpace",
    "SearchSpace",
    "allocate",
    "anchor_params",
    "architecture_signature",
    "discover",
    "find_output_layers",
    "fit_costs",
    "narrow_space",
    "seed_params",
    "suggest_plan",
    "suggest_recovery",
    "uniform_plan",
    "units_for",
]
