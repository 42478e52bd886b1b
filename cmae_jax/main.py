"""Command line: `python -m cmae_jax.main --config=configs/X.py --workdir=DIR [--config.k=v]`."""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

# First of the package: TensorFlow (which training needs for its input pipeline) is
# imported through cmae_jax.data, which hides the accelerators and matplotlib from it.
import cmae_jax.data  # noqa: F401
from cmae_jax import (
    compilation_cache,
    config_validation,
    evaluate,
    loop,
    methods,
    sharding,
    terminal,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, summaries and pictures.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs (one process per host, or per GPU). On Cloud TPU VMs, under SLURM
# (srun) and Open MPI (mpirun) 'auto' finds everything by itself; elsewhere give all three
# of coordinator_address, num_processes and process_id (launch/local_multiprocess.sh).
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed: 'auto' starts it for explicit process flags or a detected cluster "
    "(TPU VM, SLURM, Open MPI); 'on' always (auto-detection must succeed); 'off' never.",
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, reachable from every process."
)
flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    120,
    "Multi-process runs: a process that sends no heartbeat for this long counts as dead, "
    "and the others stop with an error naming it instead of waiting in a collective.",
)
flags.DEFINE_list(
    "local_device_ids",
    None,
    "Accelerators this process drives, e.g. 0,1,2,3,4,5,6,7 for one process per 8-GPU node "
    "(under SLURM / Open MPI the default is one GPU per process).",
)


def main(argv: list[str]) -> None:
    """Validates the config, then runs the method's trainer and prints its k-NN result last."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    terminal.configure(FLAGS.verbosity >= 1 or config.get("log_orbax_info", False))

    # Before anything asks JAX for devices: afterwards the backend is fixed to this process.
    try:
        local_ids = [int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids else None
        sharding.initialize_distributed(
            FLAGS.distributed,
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            local_device_ids=local_ids,
            heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
        )
    except ValueError as e:
        print(f"Flag error: {e}", file=sys.stderr)
        sys.exit(2)
    compilation_cache.enable(config.get("compilation_cache_dir", ""))
    try:
        config_validation.validate(
            config, num_devices=jax.device_count(), process_count=jax.process_count()
        )
    except config_validation.ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.info("Config:\n%s", config)

    # The method's trainer (cmae_jax.methods; MAE-CT prints its k-NN line after each of its
    # stages and returns per-stage results), or the evaluation entry point (configs/eval/:
    # the encoder of config.init by config.protocols).
    if config.method == config_validation.EVAL:
        run = evaluate.evaluate
    else:
        run = methods.get(config.method).train
    try:
        results = run(config, FLAGS.workdir)
    except loop.StartError as e:
        print(f"Start error: {e}", file=sys.stderr)
        sys.exit(2)
    if results.get("preempted"):
        # A SIGTERM / SIGINT stopped the run after a checkpoint: a clean exit.
        print(loop.exit_message(results), flush=True)
        return
    if "knn_top1" in results:
        print(f"k-NN top-1: {100 * results['knn_top1']:.2f}%", flush=True)


if __name__ == "__main__":
    app.run(main)
