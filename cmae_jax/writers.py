"""The run's metric writers (TensorBoard, log lines, metrics.jsonl) and progress report.

clu's writers import TensorFlow (for TensorBoard), so they live here, apart from the
TensorFlow-free loop, which imports this module only when a run starts.
"""

import json
import os
from collections.abc import Callable
from typing import Any

from clu import metric_writers, periodic_actions

from cmae_jax.workdir import METRICS_FILE


class JsonLinesWriter(metric_writers.interface.MetricWriter):
    """Scalars as one JSON line per step in WORKDIR/metrics.jsonl, appended (a resumed run
    adds its lines after the first run's; the newest line of a step is the current one)."""

    def __init__(self, workdir: str):
        self._path = os.path.join(workdir, METRICS_FILE)

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_summaries(self, step: int, values: Any, metadata: Any = None) -> None:
        pass

    def write_images(self, step: int, images: Any) -> None:
        pass

    def write_videos(self, step: int, videos: Any) -> None:
        pass

    def write_audios(self, step: int, audios: Any, *, sample_rate: int) -> None:
        pass

    def write_texts(self, step: int, texts: Any) -> None:
        pass

    def write_histograms(self, step: int, arrays: Any, num_buckets: Any = None) -> None:
        pass

    def write_hparams(self, hparams: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def create_writer(workdir: str, *, is_chief: bool) -> metric_writers.MetricWriter:
    """TensorBoard summaries and log lines (clu), plus metrics.jsonl on the chief of a local
    workdir; other processes only log."""
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if not is_chief or "://" in workdir:
        return writer
    return metric_writers.MultiWriter([writer, JsonLinesWriter(workdir)])


def progress_report(
    total_steps: int, writer: metric_writers.MetricWriter, every_steps: int
) -> Callable[[int], Any]:
    """clu's progress action (steps/s, uptime), called with the step after every step."""
    return periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=every_steps
    )
