"""The run's JSON files: written where the workdir does not exist yet, read back exactly."""

import json
import os

import ml_collections

from cmae_jax import workdir


def test_json_files_round_trip_and_create_the_folder(tmp_path):
    folder = str(tmp_path / "new" / "run")
    config = ml_collections.ConfigDict({"model": {"variant": "Mu/4"}, "rules": (("embed", None),)})
    workdir.write_json(folder, "config.json", config)
    workdir.write_json(folder, "results.json", {"knn_top1": 0.8009})
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f) == {"model": {"variant": "Mu/4"}, "rules": [["embed", None]]}
    assert workdir.read_json(folder, "results.json") == {"knn_top1": 0.8009}
    assert workdir.read_json(folder, "missing.json") is None
