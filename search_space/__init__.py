"""What can be pruned and how a choice is written down. Pure: no Ray, no MLflow."""

from __future__ import annotations

from ._allocation import GroupProfile, LayerCost, Profile, allocate, fit_costs, with_damage
from ._arch import Setup, call_model, flatten, structural_train_mode, synced_attributes
from ._branches import Branch, find_branches
from ._dense import DensePruner, dense_layout
from ._depth import (
    KNOWN_RESIDUALS,
    DroppableBlock,
    Skip,
    drop_blocks,
    dropped_modules,
    residual_blocks,
)
from ._discovery import (
    Discovery,
    DiscoveryError,
    Excluded,
    PrunableGroup,
    check_patterns,
    discover,
    find_output_layers,
)
from ._layers import (
    InstanceNormPruner,
    PatchMergingPruner,
    RecurrentPruner,
    WindowAttentionPruner,
)
from ._parametrized import computed_weights, copy_model, strip_parametrizations
from ._plan import PruningPlan, exact_ratio, kept_channels, kept_ratio_cap
from ._recovery import METHODS, SPARSE_PRUNERS, Recovery, RecoverySpace, suggest_recovery
from ._signature import architecture_signature
from ._space import (
    CRITERIA,
    GRANULARITIES,
    SearchSpace,
    anchor_params,
    narrow_space,
    seed_params,
    spread_order,
    suggest_plan,
    uniform_plan,
    units_for,
)
from ._stored_splits import split_size_attributes
from ._stored_views import view_size_attributes

__all__ = [
    "CRITERIA",
    "GRANULARITIES",
    "METHODS",
    "SPARSE_PRUNERS",
    "DensePruner",
    "Discovery",
    "Branch",
    "DiscoveryError",
    "DroppableBlock",
    "Excluded",
    "GroupProfile",
    "InstanceNormPruner",
    "LayerCost",
    "PatchMergingPruner",
    "Profile",
    "PrunableGroup",
    "PruningPlan",
    "RecurrentPruner",
    "Recovery",
    "RecoverySpace",
    "SearchSpace",
    "Setup",
    "WindowAttentionPruner",
    "allocate",
    "anchor_params",
    "architecture_signature",
    "call_model",
    "check_patterns",
    "computed_weights",
    "copy_model",
    "dense_layout",
    "discover",
    "KNOWN_RESIDUALS",
    "Skip",
    "drop_blocks",
    "dropped_modules",
    "find_branches",
    "find_output_layers",
    "fit_costs",
    "flatten",
    "exact_ratio",
    "kept_channels",
    "kept_ratio_cap",
    "narrow_space",
    "residual_blocks",
    "seed_params",
    "spread_order",
    "strip_parametrizations",
    "structural_train_mode",
    "split_size_attributes",
    "synced_attributes",
    "suggest_plan",
    "suggest_recovery",
    "uniform_plan",
    "units_for",
    "view_size_attributes",
    "with_damage",
]
