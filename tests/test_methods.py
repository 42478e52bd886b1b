"""The method registry: every entry's parts agree with each other, a method registered in a
test is what config defaults, validation, the input pipeline and the command line use, and
the train step runs where TensorFlow cannot be imported."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow as tf

from cmae_jax import config_defaults, config_validation, methods
from cmae_jax.config_checks import ConfigError, require
from cmae_jax.data import example_views, pipeline, sources
from cmae_jax.methods import cmae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(config, idx_dir):
    """16 px views, batch 8, on the small Fashion-MNIST folder."""
    config.dataset.idx_dir = idx_dir
    config.input.image_size = 16
    config_defaults.set_variant(config, "Mu/4")  # 4 px patches: a 4x4 grid
    config.input.global_batch_size = 8
    for stage in config.get("stages", {}).values():
        stage.input.global_batch_size = 8
    if "maect" in config:
        config.maect.queue_size = 16
    return config


def every_step(idx_dir):
    """(name, step, step config) of every registered method's every step, tiny."""
    out = []
    for name in methods.names():
        if name == "maect":
            config = config_defaults.fashion_mnist_maect_config()
        else:
            config = config_defaults.fashion_mnist_config(name)
        for stage, (step, step_config) in methods.get(name).steps(tiny(config, idx_dir)).items():
            out.append((f"{name}{'/' + stage if stage else ''}", step, step_config))
    return out


def test_every_entry_is_registered_under_its_own_name():
    for name in methods.names():
        assert methods.get(name).name == name
    with pytest.raises(KeyError, match="registered: cmae, mae, maect"):
        methods.get("simclr")


def test_each_step_yields_what_its_batch_spec_declares(small_fashion_mnist):
    source = sources.make_source(
        tiny(config_defaults.fashion_mnist_config(), small_fashion_mnist).dataset, "train"
    )
    seen = set()
    for name, step, config in every_step(small_fashion_mnist):
        spec = step.batch_spec(config)
        shapes = {k: ((8, *v.shape), np.dtype(v.dtype)) for k, v in spec.items()}
        random = step.random_batch(config, 0)
        assert {k: (v.shape, v.dtype) for k, v in random.items()} == shapes, name
        # The input pipeline's batches (its own check passed when it built them).
        batch = next(pipeline.train_dataset(config, source, start_step=0).as_numpy_iterator())
        batch.pop("corrupt")
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes, name
        seen.add(tuple(sorted(spec)))
    # Masked views with a target (CMAE), without (MAE), two crops (MAE-CT stages 2 and 3).
    assert len(seen) == 3


# ------------------------------------------------------------------- a method of a test


def fake_defaults(config):
    """MAE's defaults, and a key of the fake method's own."""
    methods.get("mae").defaults(config)
    config.fake_weight = 2.0


def fake_validate(config, checks):
    require(config.fake_weight > 0, f"config.fake_weight={config.fake_weight} must be > 0.")


def fake_views(config):
    """The flipped image, resized, as the only view: a view function of the test's own."""

    def columns(image, seed):
        image = tf.image.resize(tf.cast(image, tf.float32), (8, 8))
        return {"flipped": tf.reverse(image, axis=[1])}

    return example_views.ExampleViews(columns, name="fake_views")


def fake_spec(config):
    return {
        "flipped": jax.ShapeDtypeStruct((8, 8, 1), np.float32),
        "label": jax.ShapeDtypeStruct((), np.int32),
        "index": jax.ShapeDtypeStruct((), np.int32),
    }


def fake_train(config, workdir):
    with open(os.path.join(workdir, "trained_by_fake"), "w") as f:
        f.write(str(config.fake_weight))
    return {"knn_top1": 0.25}


FAKE_STEP = dataclasses.replace(cmae.STEP, views=fake_views, batch_spec=fake_spec)
METHOD = methods.Method(
    name="fake",
    defaults=fake_defaults,
    validate=fake_validate,
    steps=lambda config: {"": (FAKE_STEP, config)},
    train=fake_train,
)


@pytest.fixture
def fake_method(monkeypatch):
    """Registers this test module's METHOD as 'fake'."""
    monkeypatch.setitem(methods.REGISTRY, "fake", __name__)
    return METHOD


def test_a_registered_method_gets_its_defaults_and_checks(fake_method, small_fashion_mnist):
    config = config_defaults.fashion_mnist_config("fake")
    config.dataset.idx_dir = small_fashion_mnist
    assert config.method == "fake" and config.fake_weight == 2.0
    assert config.input.mask_type == "random"  # from the defaults it chose (MAE's)
    config_validation.validate(config, num_devices=1)
    config.fake_weight = -1.0
    with pytest.raises(ConfigError, match="config.fake_weight=-1.0 must be > 0"):
        config_validation.validate(config, num_devices=1)


def test_the_pipeline_runs_a_registered_methods_view_function(fake_method, small_fashion_mnist):
    config = config_defaults.fashion_mnist_config("fake")
    config.dataset.idx_dir = small_fashion_mnist
    source = sources.make_source(config.dataset, "train")
    batch = next(pipeline.train_dataset(config, source, start_step=0).as_numpy_iterator())
    assert sorted(batch) == ["corrupt", "flipped", "index", "label"]
    # Row 0 is the flipped, resized image of the example the stream scheduled first.
    image = source.tf_lookup(batch["index"][0])["image"]
    expected = tf.reverse(tf.image.resize(tf.cast(image, tf.float32), (8, 8)), axis=[1])
    np.testing.assert_array_equal(batch["flipped"][0], expected.numpy())


def test_the_pipeline_refuses_columns_that_differ_from_the_batch_spec(
    fake_method, monkeypatch, small_fashion_mnist
):
    wrong = lambda config: {
        **fake_spec(config),
        "flipped": jax.ShapeDtypeStruct((4, 4, 1), np.float32),
    }
    step = dataclasses.replace(FAKE_STEP, batch_spec=wrong)
    monkeypatch.setattr(
        sys.modules[__name__],
        "METHOD",
        dataclasses.replace(METHOD, steps=lambda config: {"": (step, config)}),
    )
    config = config_defaults.fashion_mnist_config("fake")
    config.dataset.idx_dir = small_fashion_mnist
    source = sources.make_source(config.dataset, "train")
    with pytest.raises(ValueError, match="fake_views yields .* batch_spec declares"):
        pipeline.train_dataset(config, source, start_step=0)


def test_the_command_line_runs_a_registered_methods_trainer(
    fake_method, small_fashion_mnist, tmp_path, capsys
):
    from absl import flags

    from cmae_jax import main as cli

    config_file = tmp_path / "fake_config.py"
    config_file.write_text(
        textwrap.dedent(
            f"""
            from cmae_jax.config_defaults import fashion_mnist_config

            def get_config():
                config = fashion_mnist_config("fake")
                config.dataset.idx_dir = {small_fashion_mnist!r}
                config.fake_weight = 3.0
                return config
            """
        )
    )
    workdir = tmp_path / "run"
    workdir.mkdir()
    argv = ["main", f"--config={config_file}", f"--workdir={workdir}"]
    flags.FLAGS(argv)
    try:
        cli.main(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()
    assert (workdir / "trained_by_fake").read_text() == "3.0"
    assert capsys.readouterr().out.strip().splitlines()[-1] == "k-NN top-1: 25.00%"


# ------------------------------------------------------------------- without TensorFlow

# Runs a script in a fresh interpreter where any import of tensorflow fails, as on a GPU
# machine that has jax, flax, optax and orbax but no TensorFlow.
NO_TF = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoTensorFlow())
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def run_without_tensorflow(*args):
    return subprocess.run(
        [sys.executable, "-c", NO_TF, "benchmarks/train_step.py", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


TINY = [
    "--batch=8",
    "--steps=1",
    "--rounds=1",
    "--warmup=1",
    "--config.input.image_size=16",
    "--config.input.patch_size=4",
    "--config.model.variant=Mu/4",
    # test_train.tiny_config's sizes: what runs is under test here, not its speed.
    "--config.model.width=32",
    "--config.model.depth=2",
    "--config.model.num_heads=2",
    "--config.model.pixel_decoder_width=32",
    "--config.model.pixel_decoder_depth=1",
    "--config.model.pixel_decoder_heads=2",
]


@pytest.mark.parametrize(
    "config, extra",
    [
        ("configs/fashion_mnist_cmae.py", []),
        # Stage 3 freezes the first of the 2 blocks (its own default: half of Mu's 4).
        (
            "configs/fashion_mnist_maect.py",
            ["--stage=3_tune", "--config.stages.tune.frozen_blocks=1"],
        ),
    ],
    ids=["cmae", "maect_stage3"],
)
def test_the_train_step_benchmark_runs_without_tensorflow(config, extra):
    out = run_without_tensorflow(f"--config={config}", *TINY, *extra, "--input=random")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "images/s" in out.stdout and "MFU" in out.stdout


def test_the_pipeline_modes_of_the_benchmark_say_they_need_tensorflow():
    out = run_without_tensorflow(
        "--config=configs/fashion_mnist_mae.py", *TINY, "--input=synthetic"
    )
    assert out.returncode != 0
    assert "--input=synthetic runs the tf.data input pipeline, which needs TensorFlow" in (
        out.stderr
    )
