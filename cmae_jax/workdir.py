"""The run's JSON files in its workdir (config.json, results.json, ...), local or gs://."""

import json
import os
from typing import Any

import ml_collections
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


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """Every complete line of WORKDIR/metrics.jsonl, in the order written.

    A last line without its newline is one being written (a reader polling a live run
    caught it half-way on 2026-12-05) and is left out."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        complete = f.read().split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]
