"""Command line: `python -m cmae_jax.main --config=configs/X.py --workdir=DIR [--config.k=v]`."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cmae_jax import config_validation

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, summaries and pictures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Validates the config, then runs the method's trainer and prints its k-NN result last."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config

    import jax

    import cmae_jax.data  # noqa: F401  (hides the accelerators from TensorFlow, first)

    try:
        config_validation.validate(
            config, num_devices=jax.device_count(), process_count=jax.process_count()
        )
    except config_validation.ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.info("Config:\n%s", config)

    from cmae_jax import train_cmae

    trainers = {"cmae": train_cmae.train_and_evaluate, "mae": train_cmae.train_and_evaluate}
    results = trainers[config.method](config, FLAGS.workdir)
    if "knn_top1" in results:
        print(f"k-NN top-1: {100 * results['knn_top1']:.2f}%", flush=True)


if __name__ == "__main__":
    app.run(main)
