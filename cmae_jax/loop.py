"""The one training loop of every trainer: run set-up, the guarded step, faults and recovery.

A trainer (CMAE/MAE pretraining, each MAE-CT stage, fine-tuning) describes what is its own
as a `Task` (model state, update step, the batch columns it reads, hooks) and hands it to
`train`. Everything else happens here, once:

  set-up      workdir checks (writable, not another method's run, room for a checkpoint)
              before anything compiles; writer and config.json; mesh and rules; source and
              step counts; the state created in its sharded layout.
  resume      the newest readable checkpoint (an unreadable one is logged, moved aside,
              never deleted), its data order checked; else the task's fresh-start hand-off.
  loop        the input stream from the exact data position; progress (images/s, ETA);
              scalars to TensorBoard and WORKDIR/metrics.jsonl; profiling; unreadable files
              counted; periodic evaluations; checkpoint saves.
  guards      a non-finite loss or gradient norm skips the update inside the jitted step;
              too many in a row roll back to the last good checkpoint; SIGTERM / SIGINT
              save at the next step that all processes agree on, then stop cleanly; a lost
              process in a multi-process run ends the others with its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from cmae_jax import checkpointing, sharding, train_state
from cmae_jax import workdir as workdir_files
from cmae_jax.data import pipeline, sources
from cmae_jax.evaluation import protocols

# Extra room asked of the disk beyond one checkpoint's bytes (metadata, the JSON files,
# TensorBoard events, pictures).
DISK_MARGIN = 1.1


class StartError(ValueError):
    """A run that cannot start (workdir, disk); the message names the problem and the fix."""


class NonFiniteError(FloatingPointError):
    """Training kept producing non-finite losses after every allowed rollback."""


class LostProcessError(RuntimeError):
    """Another process of a multi-process run died or stopped answering."""


# -------------------------------------------------------------------- Run set-up


def check_workdir(workdir: str, method: str) -> None:
    """Refuses an unwritable workdir or one holding another method's run.

    Runs before anything is written or compiled, so a refused start leaves the workdir as
    it was.
    """
    saved = workdir_files.read_json(workdir, "config.json")
    if saved is not None and saved.get("method") not in (None, method):
        raise StartError(
            f"{workdir} holds a run of method {saved.get('method')!r} (its config.json); this "
            f"config's method is {method!r}. Use another --workdir (the run there is kept)."
        )
    if "://" in workdir:
        return  # cloud storage: neither permissions nor free space can be probed cheaply
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise StartError(
            f"Cannot write to the workdir {workdir}: {e.strerror or e}. Use a --workdir you "
            "can write to, or fix its permissions."
        ) from None


def check_disk(workdir: str, needed_bytes: int) -> None:
    """Refuses a local workdir whose disk cannot hold one checkpoint of `needed_bytes`."""
    if "://" in workdir:
        return
    free = shutil.disk_usage(workdir).free
    if free < needed_bytes * DISK_MARGIN:
        raise StartError(
            f"The disk of {workdir} has {free / 2**30:.2f} GiB free, but one checkpoint of this "
            f"run needs {needed_bytes / 2**30:.2f} GiB. Free some space or use a --workdir on "
            "a larger disk (gs:// works too)."
        )


@dataclasses.dataclass
class Run:
    """What every trainer needs before its model: config, files, mesh, data and step counts."""

    config: ml_collections.ConfigDict
    workdir: str
    method: str
    writer: metric_writers.MetricWriter | None  # created by `train` once the start is sure
    mesh: jax.sharding.Mesh
    rules: tuple
    train_source: sources.Source
    steps_per_epoch: int
    total_steps: int

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return sharding.batch_sharding(self.mesh)

    @property
    def global_batch_size(self) -> int:
        return int(self.config.input.global_batch_size)


def set_up(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    method: str,
    train_split: str | None = None,
    writer: metric_writers.MetricWriter | None = None,
) -> Run:
    """Checks the workdir, builds writer, mesh, rules and the train source.

    `method` names the kind of run the workdir holds (config.json's method is checked
    against it); `writer` shares an existing writer (fine-tuning inside an evaluation).
    """
    check_workdir(workdir, method)

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.logical_axis_rules)
    logging.info(
        "Mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count()
    )
    accumulation = int(config.get("grad_accumulation_steps", 1) or 1)
    batch = int(config.input.global_batch_size)
    ways = accumulation * mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % ways:
        raise StartError(
            f"config.input.global_batch_size={batch} must be divisible by "
            f"config.grad_accumulation_steps x data x fsdp = {ways}, so that every "
            "micro-batch splits evenly over the devices."
        )

    source = sources.make_source(config.dataset, train_split or config.dataset.train_split)
    steps_per_epoch = pipeline.steps_per_epoch(source.num_examples, batch)
    total_steps = int(config.total_steps or config.num_epochs * steps_per_epoch)
    logging.info(
        "%s: %d training examples, %d steps per epoch, %d steps",
        method,
        source.num_examples,
        steps_per_epoch,
        total_steps,
    )
    return Run(config, workdir, method, writer, mesh, rules, source, steps_per_epoch, total_steps)


# -------------------------------------------------------------------- What a trainer gives


@dataclasses.dataclass
class Task:
    """What differs between trainers; `train` does the rest.

    init_state     rng -> state (a TrainState or subclass; leaves may be logically boxed)
    train_step     (state, batch) -> (state, metrics): not jitted; metrics must hold 'loss'
                   and 'grad_norm' (the non-finite guard reads them)
    batch_keys     the columns of the pipeline's batches the step reads
    view_fn        the pipeline's per-example views (None: the pretraining views and masks)
    start_fresh    (state, run) -> state when no checkpoint exists (e.g. load an encoder)
    log_line       metrics -> the trainer's part of the progress line
    embed          (params, images) -> pooled features, for k-NN evaluations (None: none)
    evaluated      state -> {metric suffix: params} to evaluate with `embed`
    on_log_step    (step, state) -> None at every image_every_steps and the last step
    """

    init_state: Callable[[jax.Array], Any]
    train_step: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]
    batch_keys: tuple[str, ...]
    view_fn: Callable[..., dict[str, Any]] | None = None
    start_fresh: Callable[[Any, Run], Any] | None = None
    log_line: Callable[[dict[str, float]], str] = lambda m: f"loss {m['loss']:.4f}"
    embed: Callable[[Any, jax.Array], dict[str, jax.Array]] | None = None
    evaluated: Callable[[Any], dict[str, Any]] = lambda state: {"": state.params}
    on_picture_step: Callable[[int, Any], None] | None = None


def update_in_place(fn: Callable[..., Any], state: Any, *args: Any) -> Any:
    """fn(state, *args) computed on the devices with every leaf kept in its sharding and the
    old state's memory reused: the fresh-start hand-offs of the trainers."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(fn, out_shardings=shardings, donate_argnums=0)(state, *args)


# -------------------------------------------------------------------- Guarded update step


def guarded_step(train_step: Callable) -> Callable:
    """Wraps a train step: a non-finite loss or gradient norm leaves the whole state
    (parameters, optimiser with any EMA target, BatchNorm statistics, queues) as it was,
    except the step count; and every process's stop request reaches all of them.

    `batch['stop_requested']` holds each process's stop flag on its rows; its maximum, the
    same on every process, comes back as a metric, so all processes agree on when to stop
    without a host-side collective.
    """

    def step(state: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        batch = dict(batch)
        stop_flags = batch.pop("stop_requested", jnp.zeros([1], jnp.int32))
        stop_requested = jnp.max(stop_flags)
        new_state, metrics = train_step(state, batch)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        kept = kept.replace(step=state.step + 1)
        metrics = {
            **metrics,
            "skipped_update": 1 - finite.astype(jnp.int32),
            "stop_requested": stop_requested,
        }
        return kept, metrics

    return step


def jit_step(train_step: Callable, state_shardings: Any, mesh: jax.sharding.Mesh) -> Callable:
    """The guarded step jitted with its shardings: state in place (donated), batch over
    data x fsdp, metrics replicated. Trainers, benchmarks and the compile-ahead share it."""
    return jax.jit(
        guarded_step(train_step),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


# -------------------------------------------------------------------- Signals


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop acts on at the next step; a second
    signal of the same run stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.requested:
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = True
        logging.warning(
            "Got %s: saving a checkpoint at the next step, then stopping (send it again to "
            "stop at once, without saving).",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals cannot be caught: they stay as they are.
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Puts back the handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


# -------------------------------------------------------------------- Input stream


def poison(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with every float column turned to NaN (config.guard.poison_batches)."""
    return {
        k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v
        for k, v in batch.items()
    }


def device_batches(
    run: Run, task: Task, stream_start: int, stop: StopRequest, skips: pipeline.SkipCounter
) -> Iterator[dict[str, jax.Array]]:
    """Global batches of the stream from batch `stream_start` on, with the stop flags."""
    poisoned = set(run.config.guard.get("poison_batches", ()) or ())

    def local() -> Iterator[dict[str, np.ndarray]]:
        for stream_step, batch in enumerate(skips, start=stream_start + 1):
            batch = {key: batch[key] for key in task.batch_keys}
            if stream_step in poisoned:
                logging.warning("Poisoning batch %d with NaNs (config.guard).", stream_step)
                batch = poison(batch)
            rows = len(next(iter(batch.values())))
            batch["stop_requested"] = np.full([rows], int(stop.requested), np.int32)
            yield batch

    return sharding.prefetch_to_devices(local(), run.batch_sharding)


def open_stream(
    run: Run, task: Task, stream_start: int, stop: StopRequest
) -> tuple[Iterator[dict[str, jax.Array]], pipeline.SkipCounter]:
    """(device batches, counter of replaced unreadable files) from stream batch `stream_start`."""
    local = pipeline.train_dataset(
        run.config,
        run.train_source,
        start_step=stream_start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        view_fn=task.view_fn,
    ).as_numpy_iterator()
    skips = pipeline.SkipCounter(local, run.train_source)
    return device_batches(run, task, stream_start, stop, skips), skips


# -------------------------------------------------------------------- The loop


def _lost_process_message(error: Exception) -> str:
    """Which processes stopped answering, as far as the coordination service can tell."""
    from jax._src import distributed

    client = distributed.global_state.client
    everyone = list(range(jax.process_count()))
    try:
        alive = set(client.get_live_nodes(everyone)) if client is not None else set(everyone)
        lost = [p for p in everyone if p not in alive]
    except Exception:  # the coordinator itself may be the one that is gone
        lost = []
    who = f"process {', '.join(map(str, lost))}" if lost else "another process"
    if not lost and jax.process_index() != 0:
        who = "another process (or the coordinator, process 0)"
    return (
        f"Lost {who} of this {jax.process_count()}-process run: {error}. This process "
        f"({jax.process_index()}) stops; restart all processes with the same command to "
        "resume from the last checkpoint."
    )


def _non_finite_parts(metrics: dict[str, float]) -> str:
    parts = [
        f"{k}={v}"
        for k, v in metrics.items()
        if (k.endswith("loss") or k == "grad_norm") and not np.isfinite(v)
    ]
    return ", ".join(parts) or "loss"


def train(run: Run, task: Task, *, stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains `task` in `run` from the newest checkpoint (or afresh) to its last step.

    `stop_at_step` ends the run after saving a checkpoint at that step, as a preemption
    would (the schedules still span all steps). Returns 'history' ((step, loss) of every
    logged step), 'complete', 'preempted', 'skipped_updates', 'rollbacks' and, for a
    complete run with config.eval.knn, 'knn_top1<suffix>' per `task.evaluated` entry.
    """
    config, mesh = run.config, run.mesh
    guard = config.guard
    is_chief = jax.process_index() == 0

    # ---------------------------------------------------------------- Sharded state
    rng = jax.random.key(config.seed)
    state_shardings, abstract_state = train_state.abstract_sharded_state(
        task.init_state, rng, mesh, run.rules
    )
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    check_disk(run.workdir, state_bytes)
    logging.info(
        "State: %.2fM values, %.1f MiB per checkpoint",
        sum(x.size for x in jax.tree.leaves(abstract_state.params)) / 1e6,
        state_bytes / 2**20,
    )

    # ---------------------------------------------------------------- Update step
    train_step = jit_step(task.train_step, state_shardings, mesh)

    # ---------------------------------------------------------------- Checkpoint
    checkpointer = checkpointing.Checkpointer(
        run.workdir, keep=config.keep_checkpoints, save_every_steps=config.checkpoint_every_steps
    )
    expected = lambda step, offset=0: checkpointing.data_position(
        config, step, run.steps_per_epoch, data_offset=offset
    )
    resumed = checkpointing.restore_latest(checkpointer, abstract_state, expected(0))
    if resumed is not None:
        state, position = resumed
        start_step, data_offset = position["next_step"], position.get("data_offset", 0)
        logging.info("Resumed from %s at step %d", checkpointer.directory, start_step)
    else:
        state = train_state.init_sharded(task.init_state, rng, state_shardings)
        start_step, data_offset = 0, 0
        if task.start_fresh is not None:
            state = task.start_fresh(state, run)
    # Only now, with the checkpoints known to fit this config: a refused start leaves the
    # workdir as it was.
    if run.writer is None:
        run.writer = workdir_files.create_writer(run.workdir, is_chief=is_chief)
    writer = run.writer
    if is_chief:
        saved = config.copy_and_resolve_references()
        with saved.unlocked():
            saved.method = run.method
        workdir_files.write_json(run.workdir, "config.json", saved)

    # ---------------------------------------------------------------- Evaluations
    every = int(config.eval.get("every_steps", 0) or 0)
    periodic = None
    if every and task.embed is not None:
        periodic = protocols.make_periodic(config, mesh, task.embed, writer)

    # ---------------------------------------------------------------- Loop
    end_step = run.total_steps if stop_at_step is None else min(stop_at_step, run.total_steps)
    progress = lambda: periodic_actions.ReportProgress(
        num_train_steps=run.total_steps, writer=writer, every_steps=config.log_every_steps
    )
    report_progress = progress()
    profile_steps = int(config.get("profile_steps", 0) or 0)
    # Every process traces the same steps (after 10 of warm-up and compilation) into its
    # own folder; tracing adds no collectives of its own.
    profile_first = min(start_step + 11, end_step)
    profile_last = min(profile_first + profile_steps - 1, end_step)
    history: list[tuple[int, float]] = []
    skipped_total, consecutive, rollbacks, preempted = 0, 0, 0, False
    last_log_time, last_log_step = time.time(), start_step
    step = start_step
    multiprocess = jax.process_count() > 1

    with StopRequest() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(run.rules):
        batches, skips = open_stream(run, task, start_step + data_offset, stop)
        try:
            while step < end_step:
                step += 1
                if profile_steps and step == profile_first:
                    jax.profiler.start_trace(
                        os.path.join(run.workdir, "profile", f"process_{jax.process_index()}")
                    )
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = train_step(state, next(batches))
                if profile_steps and step == profile_last:
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                # Two scalars of every step, the same on all processes: so every process
                # takes the same decisions below at the same step.
                flags = jax.device_get((metrics["skipped_update"], metrics["stop_requested"]))
                skipped, stop_now = (int(v) for v in flags)
                skipped_total += skipped
                consecutive = consecutive + 1 if skipped else 0
                report_progress(step)
                is_last = step == end_step or stop_now
                logged = None
                if step % config.log_every_steps == 0 or is_last or skipped:
                    logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.time()
                    rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
                    last_log_time, last_log_step = now, step
                    logged["images_per_sec"] = rate * run.global_batch_size
                    logged["epoch"] = step / run.steps_per_epoch
                    logged["skipped_updates"] = float(skipped_total)
                    # All processes log at the same steps, so the collective is safe here.
                    logged["skipped_files"] = float(
                        np.sum(multihost_utils.process_allgather(np.int64(skips.skipped)))
                    )
                    logged.pop("stop_requested")
                    writer.write_scalars(step, logged)
                    history.append((step, logged["loss"]))
                    eta = (run.total_steps - step) / max(rate, 1e-9) / 60
                    logging.info(
                        "%s step %d/%d | %s | %.0f images/s | ETA %.1f min%s",
                        run.method,
                        step,
                        run.total_steps,
                        task.log_line(logged),
                        logged["images_per_sec"],
                        eta,
                        " | update skipped (non-finite)" if skipped else "",
                    )

                if consecutive >= guard.max_consecutive_skips:
                    good = checkpointer.last_finite_step()
                    if rollbacks >= guard.max_rollbacks or good is None:
                        raise NonFiniteError(
                            f"Step {step}: {consecutive} updates in a row were skipped for "
                            f"non-finite values ({_non_finite_parts(logged or {})}) after "
                            f"{rollbacks} rollback(s) (config.guard.max_rollbacks="
                            f"{guard.max_rollbacks}). Last good checkpoint: "
                            + (f"step {good} in {checkpointer.directory}" if good else "none")
                            + ". Lower the learning rate, or check the data around these "
                            "steps, then resume from that checkpoint with the same command."
                        )
                    rollbacks += 1
                    # Go on from the last good state with the batches after the bad ones,
                    # rather than replaying the batches that went bad.
                    state, position = checkpointer.restore(good, abstract_state)
                    data_offset = position.get("data_offset", 0) + (step - good)
                    logging.warning(
                        "Rollback %d/%d: %d non-finite steps in a row up to step %d; back to "
                        "the checkpoint of step %d, skipping %d batches of data.",
                        rollbacks,
                        guard.max_rollbacks,
                        consecutive,
                        step,
                        good,
                        step - good,
                    )
                    step, consecutive, report_progress = good, 0, progress()
                    batches, skips = open_stream(run, task, step + data_offset, stop)
                    continue

                position = expected(step, data_offset)
                if logged is not None:
                    position["loss"] = logged["loss"]
                if stop_now:
                    preempted = step < end_step
                    checkpointer.save(step, state, position, force=True)
                    break
                # A skipped step's state equals the last one: no checkpoint of it, so a
                # run of bad steps never pushes the good checkpoints out.
                if not skipped or step == end_step:
                    checkpointer.save(step, state, position, force=step == end_step)
                if task.on_picture_step is not None and (
                    step % config.image_every_steps == 0 or step == end_step
                ):
                    task.on_picture_step(step, state)
                if periodic is not None and step % every == 0:
                    for suffix, params in task.evaluated(state).items():
                        periodic(step, params, suffix)
            checkpointer.wait()
        except (jax.errors.JaxRuntimeError, ValueError) as error:
            if multiprocess and _is_collective_failure(error):
                raise LostProcessError(_lost_process_message(error)) from error
            raise

        # ------------------------------------------------------------ Evaluation
        results: dict[str, Any] = {
            "history": history,
            "complete": step == run.total_steps,
            "preempted": preempted,
            "step": step,
            "skipped_updates": skipped_total,
            "rollbacks": rollbacks,
        }
        if results["complete"] and config.eval.knn and task.embed is not None:
            knn = protocols.make("knn", protocols.Context.for_training(config, mesh, task.embed))
            for suffix, params in task.evaluated(state).items():
                start = time.time()
                top1 = knn(params)["knn_top1"]
                results[f"knn_top1{suffix}"] = top1
                writer.write_scalars(run.total_steps, {f"knn_top1{suffix}": top1})
                logging.info(
                    "k-NN%s (k=%d) top-1 %.4f in %.0f s",
                    suffix,
                    config.eval.knn_k,
                    top1,
                    time.time() - start,
                )
    checkpointer.close()
    writer.flush()
    if preempted:
        logging.warning("Saved step %d; run the same command to resume.", step)
    results["state"] = state
    if is_chief and results["complete"]:
        final = {k: v for k, v in results.items() if isinstance(v, float | int | bool)}
        workdir_files.write_json(run.workdir, "results.json", final)
    return results


def _is_collective_failure(error: Exception) -> bool:
    text = str(error)
    return any(s in text for s in ("Gloo", "gloo", "Connection closed", "UNAVAILABLE", "DEADLINE"))


def exit_message(results: dict[str, Any]) -> str | None:
    """The command line's last words for a run stopped by a signal, else None."""
    if results.get("preempted"):
        return f"saved step {results['step']}; run the same command to resume"
    return None
