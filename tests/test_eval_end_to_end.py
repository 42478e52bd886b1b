"""The evaluation entry point end to end: a 6-step tiny CMAE run evaluated by every protocol."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_evaluation import numpy_knn
from test_train import REPO, restore_raw, tiny_config

from cmae_jax import config_validation, evaluate, sharding
from cmae_jax.config_defaults import eval_config
from cmae_jax.evaluation import features, protocols
from cmae_jax.methods import cmae as train_cmae


@pytest.fixture(scope="module")
def tiny_run(small_fashion_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tiny_cmae"))
    # tiny_config's 6 steps: the program the other tiny runs compile (a cache hit).
    train_cmae.train_and_evaluate(tiny_config(small_fashion_mnist), workdir)
    return workdir


def test_every_protocol_from_the_command_line(tiny_run, small_fashion_mnist, tmp_path):
    workdir = tmp_path / "eval"
    overrides = {
        "init": tiny_run,
        "protocols": "('knn','linear_probe','low_shot','clustering','finetune','pictures')",
        "dataset.idx_dir": small_fashion_mnist,
        "eval.batch_size": 64,
        "linear_probe.batch_size": 64,
        "linear_probe.num_epochs": 2,
        "low_shot.shots": "(5,)",
        "low_shot.fractions": "(0.1,)",
        "low_shot.seeds": "(0,)",
        "low_shot.num_steps": 20,
        "clustering.num_init": 1,
        "finetune.batch_size": 32,
        "finetune.total_steps": 2,
        "finetune.randaugment_ops": 1,
        "profile_steps": 1,
        "pictures.num_images": 4,
    }
    command = [
        sys.executable,
        "-m",
        "cmae_jax.main",
        "--config=configs/eval/all.py",
        f"--workdir={workdir}",
    ] + [f"--config.{k}={v}" for k, v in overrides.items()]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"k-NN top-1: \d+\.\d\d%", lines[-1]), out.stdout[-800:]
    with open(workdir / "eval_results.json") as f:
        results = json.load(f)
    expected = {
        "knn_top1",
        "linear_probe_top1",
        "low_shot_5_shot_top1",
        "low_shot_10pct_top1",
        "cluster_accuracy",
        "nmi",
        "finetune_top1",
    }
    assert expected <= set(results) and results["init"] == tiny_run
    # Fine-tuning runs the shared training loop: it profiles like every trainer.
    assert os.listdir(workdir / "finetune" / "profile" / "process_0")
    for key in expected:
        assert 0.0 <= results[key] <= 1.0, key
        if key != "knn_top1":
            assert f"{key}: {100 * results[key]:.2f}%" in lines
    assert f"{100 * results['knn_top1']:.2f}" in lines[-1]
    # The k-NN's confusions: every test image once, the diagonal its top-1, each class's
    # row its per-class accuracy; none of them printed as a metric line.
    confusion = np.array(results["knn_confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 128
    assert np.trace(confusion) / 128 == pytest.approx(results["knn_top1"])
    rows = confusion.sum(axis=1)
    expected = [c / n if n else None for c, n in zip(np.diag(confusion), rows, strict=True)]
    assert results["knn_top1_per_class"] == pytest.approx(expected)
    assert not any(line.startswith("knn_top1_per_class") for line in lines)
    # 10 classes, 128 test images: a 6-step encoder is still well above chance by k-NN.
    assert results["knn_top1"] > 0.2
    # The encoder was read from the run: its config.json's sizes, not the eval defaults.
    with open(workdir / "config.json") as f:
        assert json.load(f)["model"]["width"] == 32
    assert sorted(os.listdir(workdir / "pictures")) == ["attention.png", "embedding.png"]
    assert (workdir / "finetune" / "checkpoints" / "2").is_dir()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_loaded_encoder_is_the_trained_one(tiny_run, small_fashion_mnist, monkeypatch):
    config = eval_config()
    config.init = os.path.join(tiny_run, "checkpoints")
    config.dataset.idx_dir = small_fashion_mnist
    config = features.resolve_config(config)
    _, params = features.load_encoder(config.init, config)
    state, _ = restore_raw(tiny_run, 6)
    np.testing.assert_array_equal(
        np.asarray(params["encoder"]["cls"]), state["params"]["encoder"]["cls"]
    )
    # The README's commands name the run relative to the working directory.
    parent, name = os.path.split(tiny_run)
    monkeypatch.chdir(parent)
    _, relative_params = features.load_encoder(name, config)
    np.testing.assert_array_equal(
        np.asarray(relative_params["encoder"]["cls"]), state["params"]["encoder"]["cls"]
    )
    _, random_params = features.load_encoder("random", config)
    assert random_params["encoder"]["cls"].shape == params["encoder"]["cls"].shape
    assert features.load_encoder("pixels", config) == (None, None)


def test_eval_config_errors(small_fashion_mnist, tmp_path):
    config = eval_config()
    config.dataset.idx_dir = small_fashion_mnist
    config_validation.validate(config, num_devices=1)  # the shipped defaults are valid
    for key, value, message in (
        ("init", str(tmp_path / "nothing"), "config.init: No checkpoint"),
        ("protocols", ("knn", "tsne"), "config.protocols"),
        ("eval.feature", "max", "config.eval.feature"),
        ("linear_probe.optimizer", "adam", "'lars' or 'sgd'"),
    ):
        bad = config.copy_and_resolve_references()
        with bad.unlocked():
            section, _, name = key.rpartition(".")
            (bad[section] if section else bad)[name] = value
        with pytest.raises(config_validation.ConfigError, match=message):
            config_validation.validate(bad, num_devices=1)
    pixels = config.copy_and_resolve_references()
    pixels.init, pixels.protocols = "pixels", ("finetune",)
    with pytest.raises(config_validation.ConfigError, match="no encoder to fine-tune"):
        config_validation.validate(pixels, num_devices=1)


def _tokens_config(tiny_run: str, idx_dir: str):
    config = eval_config()
    config.init, config.dataset.idx_dir, config.protocols = tiny_run, idx_dir, ("knn",)
    config.eval.feature, config.eval.batch_size = "tokens", 64
    return features.resolve_config(config)


def test_knn_reads_the_flattened_patch_tokens(tiny_run, small_fashion_mnist, tmp_path):
    # eval.feature='tokens': the k-NN votes over the 16 patch tokens of the 4x4 grid,
    # flattened (16 x 32 numbers), the same as a NumPy k-NN on the encoder's own tokens.
    config = _tokens_config(tiny_run, small_fashion_mnist)
    results = evaluate.evaluate(config, str(tmp_path / "eval"))
    model, params = features.load_encoder(config.init, config)
    mesh = sharding.make_mesh(config.mesh)
    tokens_of = lambda p, images: {
        "tokens": model.encoder.apply({"params": p["encoder"]}, images)
        .tokens[:, 1:]
        .reshape(len(images), -1)
    }
    ctx = protocols.Context(config=config, mesh=mesh, embed=tokens_of)
    train, train_labels, test, test_labels = ctx.features(params)
    assert train["tokens"].shape[1] == 16 * 32
    expected = numpy_knn(train["tokens"], train_labels, test["tokens"], 20, 0.07, 10)
    assert results["knn_top1"] == pytest.approx(np.mean(expected == test_labels))


def test_features_too_large_for_the_host_are_refused_before_extraction(
    tiny_run, small_fashion_mnist, monkeypatch
):
    # On a host of 2 MiB the tokens of the 512 train and 128 test images (512 numbers each,
    # 1.25 MiB) are more than half of it: refused, naming the sizes and the pooled reads.
    config = _tokens_config(tiny_run, small_fashion_mnist)
    model, params = features.load_encoder(config.init, config)
    embed = lambda p, images: model.apply({"params": p}, images)
    ctx = protocols.Context(config=config, mesh=sharding.make_mesh(config.mesh), embed=embed)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 512}
    monkeypatch.setattr(protocols.os, "sysconf", pages.__getitem__)
    message = r"\{'tokens': 512\} .* of 640 images need 1.2 MiB .* host's 2 MiB.*'grid'"
    with pytest.raises(ValueError, match=message):
        ctx.features(params)
