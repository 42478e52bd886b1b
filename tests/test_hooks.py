"""Hooks of the training loop: when they run, where their scalars go, how config.evals
builds them; and what the terminal hides (cmae_jax.terminal)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmae_jax import loop, sharding, terminal, train_state, writers
from cmae_jax import workdir as workdir_files
from cmae_jax.config_defaults import fashion_mnist_config
from cmae_jax.evaluation import hooks as evaluation_hooks
from cmae_jax.hooks import Hook

# ---------------------------------------------------------------- A loop without a model


class CountingStream:
    """Batch i of the stream (1-based) holds the value i in every row."""

    skipped = 0

    def __init__(self, start_step: int) -> None:
        self.position = start_step

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return {"x": np.full([8, 1], self.position, np.float32)}


class CountingData:
    """64 examples, no TensorFlow: the loop needs nothing else of its train data."""

    source = None
    num_examples = 64

    def steps_per_epoch(self, global_batch_size):
        return self.num_examples // global_batch_size

    def open(self, config, start_step, view_fn):
        return CountingStream(start_step)


def sum_task():
    """The state's one parameter adds up the batches seen."""

    def init_state(rng):
        del rng
        params = {"w": jnp.zeros([1])}
        return train_state.TrainState(
            step=jnp.zeros([], jnp.int32), params=params, batch_stats={}, opt_state={}
        )

    def train_step(state, batch):
        loss = batch["x"].mean()
        new = state.replace(step=state.step + 1, params={"w": state.params["w"] + loss})
        return new, {"loss": loss, "grad_norm": jnp.ones([])}

    return loop.Task(init_state=init_state, train_step=train_step, batch_keys=("x",))


def counting_config(total_steps=6):
    config = fashion_mnist_config("cmae")
    config.input.global_batch_size = 8
    config.total_steps = total_steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.compilation_cache_dir = ""
    return config


def test_hooks_run_at_their_steps_and_their_scalars_are_kept(tmp_path):
    calls = []

    def recorder(name, scalars=None):
        def fn(step, state):
            calls.append((name, step, float(jax.device_get(state.params["w"])[0])))
            return scalars or {}

        return fn

    hooks = [
        Hook("every2", recorder("every2"), every_steps=2),
        Hook("stop", recorder("stop"), at_stop=True),
        Hook("end", recorder("end", {"final": 0.5}), at_end=True),
    ]
    workdir = str(tmp_path)

    def run(stop_at_step=None):
        run = loop.set_up(counting_config(), workdir, method="cmae", data=CountingData())
        return loop.train(run, sum_task(), hooks=hooks, stop_at_step=stop_at_step)

    first = run(stop_at_step=3)
    # The state a hook sees is the one after its step: 1 + 2 + ... + step.
    assert calls == [("every2", 2, 3.0), ("stop", 3, 6.0)]
    assert not first["complete"] and "final" not in first
    calls.clear()
    second = run()
    assert calls == [("every2", 4, 10.0), ("every2", 6, 21.0), ("stop", 6, 21.0), ("end", 6, 21.0)]
    assert second["complete"] and second["final"] == 0.5
    assert workdir_files.read_json(workdir, "results.json")["final"] == 0.5
    rows = [r for r in workdir_files.read_metrics(workdir) if "final" in r]
    assert [(r["step"], r["final"]) for r in rows] == [(6, 0.5)]


def test_metrics_lines_round_trip_and_a_line_being_written_is_left_out(tmp_path):
    # A reader polling a live run (the fault tests, the benchmark's curves) can catch the
    # newest line half-written: the complete lines come back, the partial one does not.
    writer = writers.JsonLinesWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": 2.5})
    writer.write_scalars(2, {"loss": np.float32(1.25), "lr": 0.001})
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.25, "lr": 0.001}]
    assert workdir_files.read_metrics(str(tmp_path)) == rows
    with open(tmp_path / workdir_files.METRICS_FILE, "a") as f:
        f.write('{"step": 3, "loss": 1.0')
    assert workdir_files.read_metrics(str(tmp_path)) == rows
    assert workdir_files.read_metrics(str(tmp_path / "nothing")) == []


def test_hook_steps():
    hook = Hook("h", lambda step, state: {}, every_steps=3, at_stop=True)
    assert [s for s in range(1, 11) if hook.due(s, stop_step=10)] == [3, 6, 9, 10]
    assert not Hook("end", lambda step, state: {}, at_end=True).due(10, stop_step=10)
    with pytest.raises(ValueError, match="every_steps must be >= 0"):
        Hook("bad", lambda step, state: {}, every_steps=-1)


# ---------------------------------------------------------------- config.evals


def timings(hooks):
    return [(h.name, h.every_steps, h.at_stop, h.at_end) for h in hooks]


def embed(params, images):
    return {"cls": images.reshape(images.shape[0], -1)}


def test_config_evals_follow_the_old_keys():
    config = fashion_mnist_config("cmae")
    mesh = sharding.make_mesh(config.mesh)
    pictures = lambda step, state: {}
    config.eval.every_steps = 50
    config.image_every_steps = 7
    hooks = evaluation_hooks.make_hooks(config, mesh, embed, own={"reconstructions": pictures})
    assert timings(hooks) == [
        ("knn", 0, False, True),
        ("periodic", 50, False, False),
        ("reconstructions", 7, True, False),
    ]
    assert hooks[2].fn is pictures
    # Fine-tuning asks for the periodic entries only: no full k-NN or pictures at its end.
    only = evaluation_hooks.make_hooks(config, mesh, embed, own={}, types=("periodic",))
    assert timings(only) == [("periodic", 50, False, False)]
    # A trainer without pictures skips them; switched-off evaluations build nothing.
    config.eval.knn = False
    config.eval.every_steps = 0
    assert evaluation_hooks.make_hooks(config, mesh, embed) == []
    assert config.evals.knn.at_end is False and config.evals.periodic.every_steps == 0


def test_an_unknown_evaluation_type_is_refused():
    config = fashion_mnist_config("cmae")
    config.evals.oops = dict(type="knnn", every_steps=10)
    with pytest.raises(loop.StartError, match=r"config\.evals\.oops\.type='knnn'.*known: "):
        evaluation_hooks.make_hooks(config, sharding.make_mesh(config.mesh), embed)


def test_a_protocol_that_cannot_run_during_training_is_refused():
    config = fashion_mnist_config("cmae")
    config.eval.every_steps = 10
    config.eval.periodic_protocols = ("knn", "finetune")
    with pytest.raises(loop.StartError, match=r"evals\.periodic\.protocols holds 'finetune'"):
        evaluation_hooks.make_hooks(config, sharding.make_mesh(config.mesh), embed)


# ---------------------------------------------------------------- The terminal


def record(level, pathname):
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_orbax_info_is_hidden_unless_verbose():
    hide = terminal.HideLibraryInfo()
    orbax_file = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not hide.filter(record(logging.INFO, orbax_file))
    assert hide.filter(record(logging.WARNING, orbax_file))
    assert hide.filter(record(logging.INFO, "/repo/cmae_jax/loop.py"))
    absl_logger = logging.getLogger("absl")
    try:
        terminal.configure(show_orbax_info=False)
        terminal.configure(show_orbax_info=False)  # one filter, however often configured
        assert sum(isinstance(f, terminal.HideLibraryInfo) for f in absl_logger.filters) == 1
        assert not absl_logger.filter(record(logging.INFO, orbax_file))
        terminal.configure(show_orbax_info=True)
        # Only this module's filter: progress_log's own filter (installed by any earlier run
        # in this process) hides orbax's INFO lines from the progress view on its own.
        assert not any(isinstance(f, terminal.HideLibraryInfo) for f in absl_logger.filters)
    finally:
        terminal.configure(show_orbax_info=True)
