"""The run's JSON files in its workdir (config.json, results.json, ...), local or gs://."""

import json
import os
from typing import Any

import ml_collections
from clu import metric_writers
from etils import epath

METRICS_FILE = "metrics.jsonl"


def write_json(workdir: str, name: str, value: Any) -> None:
    """Writes `value` (a ConfigDict or JSON-able data) to WORKDIR/name, creating WORKDIR."""
    folder = epath.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(value, ml_collections.ConfigDict):
        text = value.to_json_best_effort(indent=2)
    else:
        text = json.dumps(value, indent=2)
    (folder / name).write_text(text)


def read_json(workdir: str | os.PathLike, name: str) -> Any | None:
    """The content of WORKDIR/name, or None when there is no such file."""
    path = epath.Path(workdir) / name
    return json.loads(path.read_text()) if path.exists() else None


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


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """Every line of WORKDIR/metrics.jsonl, in the order written."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
