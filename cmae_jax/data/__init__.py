"""Input pipeline: data sources, stateless view generation and masking in tf.data.

TensorFlow here only feeds numpy batches to JAX; it must never claim the accelerators
JAX runs on, so importing any `cmae_jax.data` module hides GPUs/TPUs from TensorFlow.
"""

import sys

# `import tensorflow` imports Keras, whose plotting helpers import matplotlib and pyplot;
# the first import of pyplot on a machine builds matplotlib's font cache, which can take
# minutes. Nothing here plots through Keras, so matplotlib is hidden while TensorFlow
# loads (Keras then leaves those helpers unusable) and importable again afterwards.
_hide_matplotlib = "tensorflow" not in sys.modules and "matplotlib" not in sys.modules
if _hide_matplotlib:
    sys.modules["matplotlib"] = None  # type: ignore[assignment]  # makes imports fail
try:
    import tensorflow as tf
finally:
    if _hide_matplotlib:
        del sys.modules["matplotlib"]


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
