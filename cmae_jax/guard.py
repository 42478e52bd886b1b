"""The host side of the non-finite guard: after each step, go on, roll back or fail.

Inside the jitted step (loop.guarded_step) a non-finite loss or gradient norm already left
the state as it was; here the loop's decisions follow from the sequence of skipped steps
alone (config.guard), so they can be tested without a model.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import numpy as np


class NonFiniteError(FloatingPointError):
    """Training kept producing non-finite losses after every allowed rollback."""


class Action(enum.Enum):
    GO_ON = "go on"
    ROLL_BACK = "roll back"
    FAIL = "fail"


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the loop does after a step; `good_step` is the checkpoint to go back to (or None)
    and `run_length` the number of skipped steps in a row that led to it."""

    action: Action
    good_step: int | None = None
    run_length: int = 0


@dataclasses.dataclass
class Guard:
    """Counts skipped steps; after max_consecutive_skips in a row, a rollback to the last
    good checkpoint, at most max_rollbacks times, then a failure."""

    max_consecutive_skips: int
    max_rollbacks: int
    skipped_total: int = 0
    consecutive: int = 0
    rollbacks: int = 0

    @classmethod
    def from_config(cls, guard_config: Any) -> Guard:
        """The guard of config.guard."""
        return cls(int(guard_config.max_consecutive_skips), int(guard_config.max_rollbacks))

    def record(self, skipped: bool) -> None:
        """Counts one step, skipped (non-finite) or not."""
        self.skipped_total += int(skipped)
        self.consecutive = self.consecutive + 1 if skipped else 0

    def decide(self, last_good_step: Callable[[], int | None]) -> Decision:
        """Go on, roll back (counted here) or fail; `last_good_step` is asked only when a
        rollback is due (it reads checkpoint metadata)."""
        if self.consecutive < self.max_consecutive_skips:
            return Decision(Action.GO_ON)
        good, run_length = last_good_step(), self.consecutive
        if self.rollbacks >= self.max_rollbacks or good is None:
            return Decision(Action.FAIL, good, run_length)
        self.rollbacks += 1
        self.consecutive = 0
        return Decision(Action.ROLL_BACK, good, run_length)

    def error(
        self, step: int, decision: Decision, metrics: dict[str, float], directory: Any
    ) -> NonFiniteError:
        """The error of a FAIL decision at `step`: what went non-finite, what to do."""
        good = decision.good_step
        return NonFiniteError(
            f"Step {step}: {decision.run_length} updates in a row were skipped for "
            f"non-finite values ({non_finite_parts(metrics)}) after "
            f"{self.rollbacks} rollback(s) (config.guard.max_rollbacks="
            f"{self.max_rollbacks}). Last good checkpoint: "
            + (f"step {good} in {directory}" if good else "none")
            + ". Lower the learning rate, or check the data around these "
            "steps, then resume from that checkpoint with the same command."
        )


def non_finite_parts(metrics: dict[str, float]) -> str:
    """The losses and gradient norm of `metrics` that are not finite, as 'name=value'."""
    parts = [
        f"{k}={v}"
        for k, v in metrics.items()
        if (k.endswith("loss") or k == "grad_norm") and not np.isfinite(v)
    ]
    return ", ".join(parts) or "loss"
