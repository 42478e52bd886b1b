"""The train split and its resumable stream, handed to the training loop (loop.TrainData).

TensorFlow stays on this side: the loop only calls `open` and reads `num_examples`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from cmae_jax.data import pipeline, sources


@dataclasses.dataclass(frozen=True)
class TrainData:
    """A train source and the stream of this process's batches over it."""

    source: sources.Source

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, split: str | None = None) -> TrainData:
        """The split `split` (default config.dataset.train_split) of config.dataset."""
        return cls(sources.make_source(config.dataset, split or config.dataset.train_split))

    @property
    def num_examples(self) -> int:
        return self.source.num_examples

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """Training steps in one epoch of this split."""
        return pipeline.steps_per_epoch(self.num_examples, global_batch_size)

    def open(
        self,
        config: ml_collections.ConfigDict,
        start_step: int,
        view_fn: Callable[..., dict[str, Any]] | None = None,
    ) -> pipeline.SkipCounter:
        """This process's numpy batches from global stream batch `start_step` on, counting
        the unreadable files replaced (`.skipped`)."""
        local = pipeline.train_dataset(
            config,
            self.source,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            view_fn=view_fn,
        ).as_numpy_iterator()
        return pipeline.SkipCounter(local, self.source)
