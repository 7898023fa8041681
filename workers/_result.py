"""What one trial became: its status and its result record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class TrialStatus(StrEnum):
    """A trial's outcome, in the words the console, the study, MLflow and the report use.

    A ``StrEnum``: each member is its string value, so what is written (Optuna user attributes,
    MLflow tags, JSON) is the bare word, and a word read back compares equal to its member.
    """

    COMPLETE = "complete"  # finetuned and evaluated
    INFEASIBLE = "infeasible"  # over the latency constraint, not finetuned
    REJECTED = "rejected"  # dominated by the front before finetuning
    STOPPED = "stopped"  # hopeless after an epoch
    FAILED = "failed"  # an error, a timeout, a lost worker, or cancelled when the search stopped


@dataclass
class TrialResult:
    number: int
    status: TrialStatus
    plan: dict[str, Any]
    accuracy: float | None = None
    latency: dict[str, Any] | None = None
    macs: int | None = None
    params: int | None = None
    size_mb: float | None = None
    signature: str | None = None
    epoch_accuracy: list[float] = field(default_factory=list)  # the final finetune's
    recovery: dict[str, Any] = field(
        default_factory=dict
    )  # the recipe followed (search_space.Recovery)
    train_epochs: float | None = None  # forward/backward work, in epochs (see workers/_recovery.py)
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    reason: str | None = None  # why infeasible / stopped / failed
    model_bytes: bytes | None = None  # safetensors, see workers.load_pruned
    node: str = ""  # where it ran (set by the orchestrator's Ray wrapper)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model_bytes"}
