"""What the training loop runs between steps (evaluations, pictures), as the loop sees it.

The loop knows only this interface; what a hook does is decided above it, by the trainers
and cmae_jax.evaluation.hooks (built from config.evals). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

Scalars = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Hook:
    """One piece of work the loop runs at some steps: fn(step, state) -> scalars.

    every_steps  > 0: after every step that is a multiple of it (0: never)
    at_stop      also after the last step this call trains (the run's last step, or the
                 `stop_at_step` of `loop.train`; not after a stop by signal)
    at_end       once after a complete run, after its last checkpoint; its scalars join
                 the run's results
    The loop writes the scalars to the run's writer at the step they belong to.
    """

    name: str
    fn: Callable[[int, Any], Scalars]
    every_steps: int = 0
    at_stop: bool = False
    at_end: bool = False

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(
                f"Hook {self.name!r}: every_steps must be >= 0 (0: never), got {self.every_steps}."
            )

    def due(self, step: int, stop_step: int) -> bool:
        """Whether the hook runs after training step `step` of a call ending at `stop_step`."""
        periodic = self.every_steps > 0 and step % self.every_steps == 0
        return periodic or (self.at_stop and step == stop_step)

    def __call__(self, step: int, state: Any) -> Scalars:
        return self.fn(step, state)


def due_hooks(hooks: Sequence[Hook], step: int, stop_step: int) -> list[Hook]:
    """The hooks that run after training step `step`, in their given order."""
    return [hook for hook in hooks if hook.due(step, stop_step)]


def end_hooks(hooks: Sequence[Hook]) -> list[Hook]:
    """The hooks that run once after a complete run, in their given order."""
    return [hook for hook in hooks if hook.at_end]
