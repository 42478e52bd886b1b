"""The method registry: every self-supervised method is one module, listed once in REGISTRY.

A method module (cmae_jax/methods/<name>.py) defines `METHOD = Method(...)`:

  name       config.method of its runs (its REGISTRY key).
  defaults   (config) -> None: sets the method's keys on base_config's defaults (target
             view, masking, loss weights, ...). config_defaults.base_config(name) calls it;
             it is the only way a config gets them.
  validate   (config, Checks) -> None: raises config_checks.ConfigError for a method key
             that cannot work, naming the key and the fix (config_validation calls it
             after the checks every method shares).
  steps      (config) -> {stage name: (Step, that stage's config)}: the update steps the
             method trains, in order; one entry named '' for a single-step method (CMAE,
             MAE), one per stage for a staged one (MAE-CT: '1_mae', '2_head', '3_tune').
             The compile-ahead (cmae_jax.aot) and benchmarks/train_step.py build a step
             from here exactly as the trainer does.
  train      (config, workdir, **stop) -> results dict (cmae_jax.loop.train's, or a
             summary per stage): the trainer entry that `python -m cmae_jax.main` runs;
             results may hold 'knn_top1' (printed last) and 'preempted'.

A `Step` (one update step, e.g. one stage of a staged method) provides:

  batch_spec         (config) -> {column: jax.ShapeDtypeStruct of ONE example}: the columns
                     its view function yields and its update step reads. The compile-ahead
                     builds its abstract batch from it, and the input pipeline checks the
                     view function's tf.data element spec against it.
  views              (config) -> cmae_jax.data.example_views.ExampleViews: the per-example
                     view function (what part of an image to read, and image + seed -> the
                     columns). Imports TensorFlow when called, so only the input pipeline
                     calls it: everything else here runs where TensorFlow is missing.
  build              (config, steps_per_epoch, total_steps) -> StepParts (model, initial
                     state, update step); pure JAX, no TensorFlow.
  flops_per_example  (config) -> analytic model FLOPs of one example's update (matmuls and
                     attention, forward + backward, no rematerialisation: MFU's numerator).
  random_batch       (config, seed) -> numpy batch of batch_spec's columns (global batch
                     rows), valid for the step (e.g. real masks): benchmarks on random data.

Adding a method: its method module (+ a model module in cmae_jax/models/ if it needs one),
its configs, its tests, and ONE line in REGISTRY below. Nothing else in the package names
a method: main, config validation, config defaults, the input pipeline, the compile-ahead
and the benchmarks look it up here.

This package imports neither TensorFlow nor the method modules; `get` imports one module
when it is asked for (a config file then loads only the method it names).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The columns of a two-crop step's views (MoCo v3, MAE-CT stages 2 and 3).
TWO_VIEWS = ("view1", "view2")

# config.method -> the module defining its METHOD. One line per method.
REGISTRY: dict[str, str] = {
    "cmae": "cmae_jax.methods.cmae",
    "mae": "cmae_jax.methods.mae",
    "maect": "cmae_jax.methods.maect",
    "mocov3": "cmae_jax.methods.mocov3",
}


@dataclasses.dataclass(frozen=True)
class Checks:
    """What a method's config checks may depend on besides the config."""

    num_devices: int
    process_count: int = 1
    check_data: bool = True  # also check files: data, checkpoints to start from


@dataclasses.dataclass(frozen=True)
class StepParts:
    """An update step built from a config, as the trainer builds it.

    model        the flax module; its `encoder_spec` builds the encoder that k-NN reads
    init_state   rng -> state (TrainState or subclass; leaves logically boxed)
    make_update  state shardings (or None) -> (state, batch) -> (state, metrics), not
                 jitted; cmae_jax.loop.jit_step jits it with the guard
    """

    model: Any
    init_state: Callable[[Any], Any]
    make_update: Callable[[Any], Callable[[Any, Mapping[str, Any]], tuple[Any, dict]]]


@dataclasses.dataclass(frozen=True)
class Step:
    """One update step of a method (see the module docstring for each field)."""

    batch_spec: Callable[[Any], dict[str, Any]]
    views: Callable[[Any], Any]
    build: Callable[[Any, int, int], StepParts]
    flops_per_example: Callable[[Any], float]
    random_batch: Callable[[Any, int], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Method:
    """A self-supervised method (see the module docstring for each field)."""

    name: str
    defaults: Callable[[Any], None]
    validate: Callable[[Any, Checks], None]
    steps: Callable[[Any], dict[str, tuple[Step, Any]]]
    train: Callable[..., dict[str, Any]]


def names() -> tuple[str, ...]:
    """The registered methods' names (config.method values)."""
    return tuple(REGISTRY)


def get(name: str) -> Method:
    """The Method registered as `name`; KeyError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise KeyError(f"Unknown method {name!r}; registered: {', '.join(REGISTRY)}.")
    method = importlib.import_module(REGISTRY[name]).METHOD
    if method.name != name:
        raise ValueError(f"{REGISTRY[name]}.METHOD is named {method.name!r}, registered {name!r}.")
    return method


def step_for(config: Any) -> Step:
    """The step that trains `config`: its method's only step, or, for a staged method, the
    stage whose config it is (the stage's config names its stage: config.stage)."""
    steps = get(config.method).steps(config)
    if len(steps) != 1:
        raise ValueError(
            f"config.method={config.method!r} trains {len(steps)} steps ({', '.join(steps)}); "
            "pass the config of one stage (its `steps` entry)."
        )
    ((step, _),) = steps.values()
    return step


# ------------------------------------------------- Step parts that several methods share


def two_view_batch_spec(config: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """batch_spec of a two-crop step: two whole views, label, index."""
    inp = config.input
    image = jax.ShapeDtypeStruct((inp.image_size, inp.image_size, inp.channels), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return {**dict.fromkeys(TWO_VIEWS, image), "label": scalar, "index": scalar}


def two_crop_views(config: Any) -> Any:
    """views of a two-crop step: two crops of the whole image (example_views.two_crop_views)."""
    # TF-free: example_views imports TensorFlow; only the input pipeline calls this.
    from cmae_jax.data import example_views

    return example_views.two_crop_views(config)


def random_batch(
    config: Any, seed: int = 0, *, views: Sequence[str] = TWO_VIEWS
) -> dict[str, np.ndarray]:
    """A global batch of random data for benchmarks: label, index and normal images under
    each name in `views` (a two-crop step's random_batch as it stands)."""
    inp = config.input
    rng = np.random.default_rng(seed)
    shape = (inp.global_batch_size, inp.image_size, inp.image_size, inp.channels)
    batch = {
        "label": rng.integers(0, 10, shape[0]).astype(np.int32),
        "index": np.arange(shape[0], dtype=np.int32),
    }
    for view in views:
        batch[view] = rng.normal(size=shape).astype(np.float32)
    return batch
