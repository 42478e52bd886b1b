"""The one training loop of every trainer: run set-up, the guarded step, faults and recovery.

A trainer (CMAE/MAE pretraining, each MAE-CT stage, fine-tuning) describes what is its own
as a `Task` (model state, update step, the batch columns it reads) and hands it to `train`
with its hooks (cmae_jax.hooks: evaluations, pictures, built above the loop). Everything
else happens here, once:

  set-up      workdir checks (writable, not another method's run, room for a checkpoint)
              before anything compiles; writer and config.json; mesh and rules; step counts
              of the train data the trainer hands in; the state in its sharded layout.
  resume      the newest readable checkpoint (an unreadable one is logged, moved aside,
              never deleted), its data order checked; else the task's fresh-start hand-off.
  loop        the input stream from the exact data position; progress (images/s, ETA);
              scalars to TensorBoard and WORKDIR/metrics.jsonl; profiling; unreadable files
              counted; checkpoint saves; the hooks at their steps and after the run.
  guards      a non-finite loss or gradient norm skips the update inside the jitted step;
              too many in a row roll back to the last good checkpoint (cmae_jax.guard);
              SIGTERM / SIGINT save at the next step that all processes agree on, then
              stop cleanly; a lost process in a multi-process run ends the others with its
              name.

Nothing here imports TensorFlow: the input pipeline comes in as a `TrainData`
(cmae_jax.data.train_data), the evaluations as hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cmae_jax import checkpointing, sharding, train_state
from cmae_jax import workdir as workdir_files
from cmae_jax.guard import Action, Decision, Guard
from cmae_jax.hooks import Hook, due_hooks, end_hooks

# Extra room asked of the disk beyond one checkpoint's bytes (metadata, the JSON files,
# TensorBoard events, pictures).
DISK_MARGIN = 1.1


class StartError(ValueError):
    """A run that cannot start (workdir, disk, hooks); the message names the problem and
    the fix."""


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


class Writer(Protocol):
    """Where a run's scalars and pictures go (a clu MetricWriter, cmae_jax.writers)."""

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None: ...

    def write_images(self, step: int, images: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...


class BatchStream(Protocol):
    """This process's numpy batches; `skipped` counts the unreadable files replaced."""

    skipped: int

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...


class TrainData(Protocol):
    """The train split as the loop reads it (cmae_jax.data.train_data.TrainData)."""

    source: Any
    num_examples: int

    def steps_per_epoch(self, global_batch_size: int) -> int: ...

    def open(
        self, config: ml_collections.ConfigDict, start_step: int, view_fn: Callable | None
    ) -> BatchStream: ...


@dataclasses.dataclass
class Run:
    """What every trainer needs before its model: config, files, mesh, data and step counts."""

    config: ml_collections.ConfigDict
    workdir: str
    method: str
    writer: Writer | None  # created by `train` once the start is sure
    mesh: jax.sharding.Mesh
    rules: tuple
    data: TrainData
    steps_per_epoch: int
    total_steps: int

    @property
    def train_source(self) -> Any:
        """The train split's source (cmae_jax.data.sources.Source)."""
        return self.data.source

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
    data: TrainData,
    writer: Writer | None = None,
) -> Run:
    """Checks the workdir, builds mesh and rules, counts the steps of `data`.

    `method` names the kind of run the workdir holds (config.json's method is checked
    against it); `writer` shares an existing writer (fine-tuning inside an evaluation).
    """
    check_workdir(workdir, method)

    mesh, rules = sharding.mesh_and_rules(config)
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

    steps_per_epoch = data.steps_per_epoch(batch)
    total_steps = int(config.total_steps or config.num_epochs * steps_per_epoch)
    logging.info(
        "%s: %d training examples, %d steps per epoch, %d steps",
        method,
        data.num_examples,
        steps_per_epoch,
        total_steps,
    )
    return Run(config, workdir, method, writer, mesh, rules, data, steps_per_epoch, total_steps)


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
    """

    init_state: Callable[[jax.Array], Any]
    train_step: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]
    batch_keys: tuple[str, ...]
    view_fn: Callable[..., dict[str, Any]] | None = None
    start_fresh: Callable[[Any, Run], Any] | None = None
    log_line: Callable[[dict[str, float]], str] = lambda m: f"loss {m['loss']:.4f}"


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
    run: Run, task: Task, stream_start: int, stop: StopRequest, skips: BatchStream
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
) -> tuple[Iterator[dict[str, jax.Array]], BatchStream]:
    """(device batches, counter of replaced unreadable files) from stream batch `stream_start`."""
    skips = run.data.open(run.config, stream_start, task.view_fn)
    return device_batches(run, task, stream_start, stop, skips), skips


# -------------------------------------------------------------------- Lost processes


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


@contextlib.contextmanager
def lost_processes_named() -> Iterator[None]:
    """Turns a failed collective of a multi-process run into a LostProcessError that names
    the processes that stopped answering."""
    try:
        yield
    except (jax.errors.JaxRuntimeError, ValueError) as error:
        if jax.process_count() > 1 and _is_collective_failure(error):
            raise LostProcessError(_lost_process_message(error)) from error
        raise


# -------------------------------------------------------------------- Pieces of `train`


def sharded_layout(run: Run, task: Task, rng: jax.Array) -> tuple[Any, Any]:
    """(state shardings, abstract state) of the task; refuses a disk too small for one
    checkpoint of it."""
    state_shardings, abstract_state = train_state.abstract_sharded_state(
        task.init_state, rng, run.mesh, run.rules
    )
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    check_disk(run.workdir, state_bytes)
    logging.info(
        "State: %.2fM values, %.1f MiB per checkpoint",
        sum(x.size for x in jax.tree.leaves(abstract_state.params)) / 1e6,
        state_bytes / 2**20,
    )
    return state_shardings, abstract_state


def restore_or_start(
    run: Run,
    task: Task,
    checkpointer: checkpointing.Checkpointer,
    layout: tuple[Any, Any],
    rng: jax.Array,
) -> tuple[Any, int, int]:
    """(state, its step, data offset) of the newest readable checkpoint, else a fresh state
    after the task's fresh-start hand-off."""
    state_shardings, abstract_state = layout
    start = checkpointing.data_position(run.config, 0, run.steps_per_epoch)
    resumed = checkpointing.restore_latest(checkpointer, abstract_state, start)
    if resumed is not None:
        state, position = resumed
        logging.info("Resumed from %s at step %d", checkpointer.directory, position["next_step"])
        return state, position["next_step"], position.get("data_offset", 0)
    state = train_state.init_sharded(task.init_state, rng, state_shardings)
    if task.start_fresh is not None:
        state = task.start_fresh(state, run)
    return state, 0, 0


def open_outputs(run: Run, create_writer: Callable[..., Writer]) -> Writer:
    """The run's writer and config.json: only once the checkpoints are known to fit this
    config, so that a refused start leaves the workdir as it was."""
    is_chief = jax.process_index() == 0
    if run.writer is None:
        run.writer = create_writer(run.workdir, is_chief=is_chief)
    if is_chief:
        saved = run.config.copy_and_resolve_references()
        with saved.unlocked():
            saved.method = run.method
        workdir_files.write_json(run.workdir, "config.json", saved)
    return run.writer


class Profile:
    """Traces config.profile_steps steps, after 10 of warm-up and compilation, on every
    process into its own folder (tracing adds no collectives of its own)."""

    def __init__(self, run: Run, start_step: int, end_step: int) -> None:
        self.steps = int(run.config.get("profile_steps", 0) or 0)
        self.first = min(start_step + 11, end_step)
        self.last = min(self.first + self.steps - 1, end_step)
        self.folder = os.path.join(run.workdir, "profile", f"process_{jax.process_index()}")

    def step(self, step: int, train_step: Callable, state: Any, batches: Iterator) -> Any:
        """train_step(state, next batch) as training step `step`, the batch's fetch
        included, traced when due."""
        if self.steps and step == self.first:
            # Without the Python tracer: stopping it walks every Python thread while orbax's
            # async-checkpoint threads come and go, and once (CI, 2026-12-06) stop_trace
            # segfaulted there. The host and device traces and the step annotations stay.
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0
            jax.profiler.start_trace(self.folder, profiler_options=options)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            out = train_step(state, next(batches))
        if self.steps and step == self.last:
            jax.block_until_ready(out)
            jax.profiler.stop_trace()
        return out


class ProgressLog:
    """Progress lines, TensorBoard / metrics.jsonl scalars and the (step, loss) history of
    the logged steps: every config.log_every_steps, the last step and skipped steps."""

    def __init__(
        self, run: Run, task: Task, start_step: int, report: Callable[..., Callable[[int], Any]]
    ) -> None:
        """`report(total_steps, writer, every_steps)`: an action called with every step."""
        self.run, self.task, self._new_report = run, task, report
        self.history: list[tuple[int, float]] = []
        self.restart(start_step)

    def restart(self, step: int) -> None:
        """Starts the images/s and ETA measurements afresh at `step` (start, rollback)."""
        self._report = self._new_report(
            self.run.total_steps, self.run.writer, self.run.config.log_every_steps
        )
        self._time, self._step = time.time(), step

    def __call__(
        self,
        step: int,
        metrics: dict[str, jax.Array],
        skipped: int,
        is_last: bool,
        skipped_updates: int,
        skips: BatchStream,
    ) -> dict[str, float] | None:
        """Logs `step` when due; returns its scalars then, else None."""
        run = self.run
        self._report(step)
        if not (step % run.config.log_every_steps == 0 or is_last or skipped):
            return None
        logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        rate = (step - self._step) / max(now - self._time, 1e-9)
        self._time, self._step = now, step
        logged["images_per_sec"] = rate * run.global_batch_size
        logged["epoch"] = step / run.steps_per_epoch
        logged["skipped_updates"] = float(skipped_updates)
        # All processes log at the same steps, so the collective is safe here.
        logged["skipped_files"] = float(
            np.sum(multihost_utils.process_allgather(np.int64(skips.skipped)))
        )
        logged.pop("stop_requested")
        run.writer.write_scalars(step, logged)
        self.history.append((step, logged["loss"]))
        eta = (run.total_steps - step) / max(rate, 1e-9) / 60
        logging.info(
            "%s step %d/%d | %s | %.0f images/s | ETA %.1f min%s",
            run.method,
            step,
            run.total_steps,
            self.task.log_line(logged),
            logged["images_per_sec"],
            eta,
            " | update skipped (non-finite)" if skipped else "",
        )
        return logged


def roll_back(
    checkpointer: checkpointing.Checkpointer,
    abstract_state: Any,
    guard: Guard,
    decision: Decision,
    step: int,
) -> tuple[Any, int]:
    """(state, data offset) of the decision's good checkpoint, going on with the batches
    after the bad ones rather than replaying them."""
    good, run_length = decision.good_step, decision.run_length
    state, position = checkpointer.restore(good, abstract_state)
    logging.warning(
        "Rollback %d/%d: %d non-finite steps in a row up to step %d; back to "
        "the checkpoint of step %d, skipping %d batches of data.",
        guard.rollbacks,
        guard.max_rollbacks,
        run_length,
        step,
        good,
        step - good,
    )
    return state, position.get("data_offset", 0) + (step - good)


def step_flags(metrics: dict[str, jax.Array]) -> tuple[int, int]:
    """(skipped, stop requested) of a step: two scalars, the same on all processes, so
    every process takes the same decisions at the same step."""
    flags = jax.device_get((metrics["skipped_update"], metrics["stop_requested"]))
    return int(flags[0]), int(flags[1])


def data_position(run: Run, step: int, data_offset: int, logged: dict | None) -> dict:
    """The checkpoint's record of the input stream after `step`, with the step's loss when
    it was logged (so that a rollback finds the last finite one)."""
    position = checkpointing.data_position(
        run.config, step, run.steps_per_epoch, data_offset=data_offset
    )
    if logged is not None:
        position["loss"] = logged["loss"]
    return position


def save(
    checkpointer: checkpointing.Checkpointer, step: int, state: Any, position: dict, force: bool
) -> None:
    """Saves `step` when due (or `force`), with one line of ours per save (cmae_jax.terminal
    hides orbax's own)."""
    if checkpointer.save(step, state, position, force=force):
        logging.info("saved checkpoint step %d", step)


def run_hooks(hooks: Sequence[Hook], step: int, state: Any, writer: Writer) -> dict[str, float]:
    """Runs `hooks` on `state`; their scalars go to the writer at `step` and come back."""
    scalars: dict[str, float] = {}
    for hook in hooks:
        out = hook(step, state)
        if out:
            writer.write_scalars(step, out)
            scalars.update(out)
    return scalars


def finish(run: Run, checkpointer: checkpointing.Checkpointer, results: dict[str, Any]) -> None:
    """Closes checkpoints and writer; a complete run's scalar results to results.json."""
    checkpointer.close()
    run.writer.flush()
    if results["preempted"]:
        logging.warning("Saved step %d; run the same command to resume.", results["step"])
    if jax.process_index() == 0 and results["complete"]:
        final = {k: v for k, v in results.items() if isinstance(v, float | int | bool)}
        workdir_files.write_json(run.workdir, "results.json", final)


# -------------------------------------------------------------------- The loop


def train(
    run: Run, task: Task, *, hooks: Sequence[Hook] = (), stop_at_step: int | None = None
) -> dict[str, Any]:
    """Trains `task` in `run` from the newest checkpoint (or afresh) to its last step,
    running `hooks` at their steps.

    `stop_at_step` ends the run after saving a checkpoint at that step, as a preemption
    would (the schedules still span all steps). Returns 'history' ((step, loss) of every
    logged step), 'complete', 'preempted', 'step', 'skipped_updates', 'rollbacks', 'state'
    and, for a complete run, the scalars of the at_end hooks.
    """
    # clu's writers import TensorFlow: imported here, when a run starts, so that the update
    # step (jit_step) imports where TensorFlow is not installed.
    from cmae_jax import writers

    config = run.config
    rng = jax.random.key(config.seed)
    layout = sharded_layout(run, task, rng)
    train_step = jit_step(task.train_step, layout[0], run.mesh)
    checkpointer = checkpointing.Checkpointer(
        run.workdir, keep=config.keep_checkpoints, save_every_steps=config.checkpoint_every_steps
    )
    state, step, data_offset = restore_or_start(run, task, checkpointer, layout, rng)
    writer = open_outputs(run, writers.create_writer)
    end_step = run.total_steps if stop_at_step is None else min(stop_at_step, run.total_steps)
    guard, profile = Guard.from_config(config.guard), Profile(run, step, end_step)
    progress = ProgressLog(run, task, step, writers.progress_report)
    preempted = False
    with StopRequest() as stop, jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        with lost_processes_named():
            batches, skips = open_stream(run, task, step + data_offset, stop)
            while step < end_step:
                step += 1
                state, metrics = profile.step(step, train_step, state, batches)
                skipped, stop_now = step_flags(metrics)
                guard.record(skipped)
                is_last = step == end_step or bool(stop_now)
                logged = progress(step, metrics, skipped, is_last, guard.skipped_total, skips)
                decision = guard.decide(checkpointer.last_finite_step)
                if decision.action is Action.FAIL:
                    raise guard.error(step, decision, logged or {}, checkpointer.directory)
                if decision.action is Action.ROLL_BACK:
                    state, data_offset = roll_back(checkpointer, layout[1], guard, decision, step)
                    step = decision.good_step
                    progress.restart(step)
                    batches, skips = open_stream(run, task, step + data_offset, stop)
                    continue
                position = data_position(run, step, data_offset, logged)
                if stop_now:
                    preempted = step < end_step
                    save(checkpointer, step, state, position, force=True)
                    break
                # A skipped step's state equals the last one: no checkpoint of it, so a
                # run of bad steps never pushes the good checkpoints out.
                if not skipped or step == end_step:
                    save(checkpointer, step, state, position, force=step == end_step)
                run_hooks(due_hooks(hooks, step, end_step), step, state, writer)
            checkpointer.wait()
        results: dict[str, Any] = {
            "history": progress.history,
            "complete": step == run.total_steps,
            "preempted": preempted,
            "step": step,
            "skipped_updates": guard.skipped_total,
            "rollbacks": guard.rollbacks,
        }
        if results["complete"]:
            results.update(run_hooks(end_hooks(hooks), step, state, writer))
    finish(run, checkpointer, results)
    results["state"] = state
    return results


def _is_collective_failure(error: Exception) -> bool:
    text = str(error)
    return any(s in text for s in ("Gloo", "gloo", "Connection closed", "UNAVAILABLE", "DEADLINE"))


def exit_message(results: dict[str, Any]) -> str | None:
    """The command line's last words for a run stopped by a signal, else None."""
    if results.get("preempted"):
        return f"saved step {results['step']}; run the same command to resume"
    return None
