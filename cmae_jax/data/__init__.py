"""Input pipeline: data sources, stateless view generation and masking in tf.data.

TensorFlow here only feeds numpy batches to JAX; it must never claim the accelerators
JAX runs on, so importing any `cmae_jax.data` module hides GPUs/TPUs from TensorFlow.
"""

import tensorflow as tf


def _hide_accelerators_from_tf() -> None:
    # With a full (non-CPU) TensorFlow build, TF would otherwise reserve GPU memory.
    # Raises RuntimeError if TF already initialised its devices; then it is too late to
    # change and the caller made that choice.
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass


_hide_accelerators_from_tf()
