"""Faults and recovery (README "Faults and recovery"): non-finite steps, rollbacks, damaged
checkpoints, kill -9, SIGTERM, a lost process, bad start conditions."""

import gc
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import REPO, assert_trees_equal, flat_arrays, restore_raw, tiny_config

from cmae_jax import checkpointing, guard, loop, sharding, train_state
from cmae_jax import workdir as workdir_files
from cmae_jax.methods import cmae as train_cmae

# ---------------------------------------------------------------- The guard inside the step


def test_non_finite_step_leaves_the_whole_state_unchanged(small_fashion_mnist):
    config = tiny_config(small_fashion_mnist)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(())
    model, tx, lr, momentum = train_cmae.make_model_and_optimizer(config, 16, 6)
    state, shardings, _ = train_state.create_sharded_state(
        train_cmae.make_init_state(model, tx, config), jax.random.key(0), mesh, rules
    )
    step = train_cmae.jit_train_step(model, config, tx, lr, momentum, shardings, mesh)
    size, grid = config.input.image_size, config.input.image_size // config.input.patch_size
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(grid * grid) for _ in range(32)]).astype(np.int32)
    batch = {
        "online": rng.normal(size=(32, size, size, 1)).astype(np.float32),
        "target": rng.normal(size=(32, size, size, 1)).astype(np.float32),
        "ids_keep": np.sort(ids[:, :5], axis=1),
        "ids_mask": np.sort(ids[:, 5:], axis=1),
    }
    with jax.set_mesh(mesh):
        good, metrics = step(state, batch)
        assert int(metrics["skipped_update"]) == 0
        before = jax.device_get(good)
        batch["online"][3, 0, 0, 0] = np.nan  # one pixel of one example
        after, metrics = step(good, batch)
    assert int(metrics["skipped_update"]) == 1 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(after)
    assert int(after.step) == int(before.step) + 1
    # Parameters, Adam moments, EMA target and BatchNorm statistics: bit for bit.
    for part in ("params", "opt_state", "batch_stats"):
        assert_trees_equal(getattr(after, part), getattr(before, part))


def test_guard_counts_the_stop_request_of_any_process():
    step = jax.jit(
        loop.guarded_step(lambda s, b: (s, {"loss": b["x"].sum(), "grad_norm": jnp.ones([])}))
    )
    state = train_state.TrainState(
        step=jnp.zeros([], jnp.int32), params={}, batch_stats={}, opt_state={}
    )
    _, metrics = step(state, {"x": jnp.ones([4]), "stop_requested": jnp.array([0, 0, 1, 0])})
    assert int(metrics["stop_requested"]) == 1 and int(metrics["skipped_update"]) == 0


# ---------------------------------------------------------------- The guard's decisions


def decisions(flags, *, max_consecutive_skips=2, max_rollbacks=1, good=5):
    """(guard, [action per step]) after feeding it one skipped flag per step."""
    checker = guard.Guard(max_consecutive_skips, max_rollbacks)
    actions = []
    for skipped in flags:
        checker.record(skipped)
        actions.append(checker.decide(lambda: good).action)
    return checker, actions


def test_guard_goes_on_through_isolated_skips():
    checker, actions = decisions([0, 1, 0, 1, 0, 0, 1])
    assert actions == [guard.Action.GO_ON] * 7
    assert checker.skipped_total == 3 and checker.consecutive == 1 and checker.rollbacks == 0


def test_guard_rolls_back_after_a_run_of_skips_then_fails():
    go, back, fail = guard.Action.GO_ON, guard.Action.ROLL_BACK, guard.Action.FAIL
    checker, actions = decisions([1, 1, 0, 1, 1], max_consecutive_skips=2, max_rollbacks=1)
    assert actions == [go, back, go, go, fail]
    assert checker.rollbacks == 1 and checker.skipped_total == 4
    # A rollback starts the count of skips in a row afresh; the failure keeps it.
    assert checker.consecutive == 2


def test_guard_asks_for_the_good_checkpoint_only_when_a_rollback_is_due():
    checker = guard.Guard(max_consecutive_skips=3, max_rollbacks=2)
    asked = []
    for skipped in (1, 1, 0, 1, 1, 1):
        checker.record(skipped)
        decision = checker.decide(lambda: asked.append(True) or 7)
    assert len(asked) == 1
    assert decision == guard.Decision(guard.Action.ROLL_BACK, good_step=7, run_length=3)


def test_guard_fails_without_a_good_checkpoint_and_says_so():
    checker, actions = decisions([1], max_consecutive_skips=1, max_rollbacks=3, good=None)
    assert actions == [guard.Action.FAIL]
    decision = checker.decide(lambda: None)
    error = checker.error(9, decision, {"loss": float("nan"), "grad_norm": 1.0}, "/w/checkpoints")
    assert isinstance(error, FloatingPointError)
    message = str(error)
    assert message.startswith("Step 9: 1 updates in a row were skipped")
    assert "(loss=nan)" in message and "Last good checkpoint: none." in message
    assert "max_rollbacks=3" in message


# ---------------------------------------------------------------- NaNs end to end


def guarded_config(idx, **guard):
    # tiny_config's 6 steps: the program (total_steps is baked into the lr schedule) the
    # other runs of the suite compile, so a cache hit.
    config = tiny_config(idx)
    config.checkpoint_every_steps = 1
    config.keep_checkpoints = 10
    config.guard.update(guard)
    return config


def loss_rows(workdir):
    """The training-step lines of metrics.jsonl (the progress reporter writes others)."""
    return [row for row in workdir_files.read_metrics(workdir) if "loss" in row]


def logged(workdir, key):
    """{step: value} of the last line logged for each step in metrics.jsonl."""
    return {int(row["step"]): row[key] for row in workdir_files.read_metrics(workdir) if key in row}


def test_nan_batches_are_skipped_then_rolled_back(small_fashion_mnist, tmp_path):
    # Batch 2 alone: skipped, training goes on. Batches 4 and 5: two in a row, so back to
    # the checkpoint of step 3, continuing with batches 6, 7, ... (data offset 2).
    config = guarded_config(small_fashion_mnist, poison_batches=(2, 4, 5), max_consecutive_skips=2)
    workdir = str(tmp_path)
    results = train_cmae.train_and_evaluate(config, workdir)
    assert results["complete"] and results["skipped_updates"] == 3 and results["rollbacks"] == 1
    rows = loss_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 4, 5, 6]
    assert [r["skipped_update"] for r in rows] == [0, 1, 0, 1, 1, 0, 0, 0]
    assert [r["skipped_updates"] for r in rows][-1] == 3
    assert all(np.isfinite(r["loss"]) != r["skipped_update"] for r in rows)
    # A skipped step's state is the one before it: no checkpoint was written for it.
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert 2 not in steps and {3, 6} <= set(steps)
    state, position = restore_raw(workdir, 6)
    assert position["next_step"] == 6 and position["data_offset"] == 2 and int(state["step"]) == 6
    assert all(np.isfinite(v).all() for v in flat_arrays(state).values())


def test_endless_nans_stop_with_a_clear_message(small_fashion_mnist, tmp_path):
    config = guarded_config(
        small_fashion_mnist,
        poison_batches=tuple(range(4, 40)),
        max_consecutive_skips=2,
        max_rollbacks=1,
    )
    with pytest.raises(guard.NonFiniteError) as error:
        train_cmae.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert "Step 5" in message and "reconstruction_loss=nan" in message
    assert "Last good checkpoint: step 3" in message and "max_rollbacks=1" in message


# ---------------------------------------------------------------- Damaged checkpoints


def test_truncated_newest_checkpoint_resumes_from_the_previous(
    small_fashion_mnist, tmp_path, caplog
):
    workdir = str(tmp_path / "run")
    train_cmae.train_and_evaluate(tiny_config(small_fashion_mnist), workdir)
    intact = str(tmp_path / "intact")
    shutil.copytree(workdir, intact)
    # Newest checkpoint (6): cut its largest data file in half.
    files = glob.glob(f"{workdir}/checkpoints/6/state/**", recursive=True)
    largest = max((f for f in files if os.path.isfile(f)), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    with caplog.at_level("WARNING"):
        results = train_cmae.train_and_evaluate(tiny_config(small_fashion_mnist), workdir)
    # Resumed from step 3 and ran 4..6 again, with the same result as the intact run.
    assert [s for s, _ in results["history"]] == [4, 5, 6]
    assert_trees_equal(restore_raw(workdir, 6)[0], restore_raw(intact, 6)[0])
    # The damaged checkpoint is kept aside, whole, and the log says which and why.
    set_aside = glob.glob(f"{workdir}/checkpoints/unreadable_6_*")
    assert len(set_aside) == 1 and os.path.exists(set_aside[0] + largest[len(workdir) + 14 :])
    assert any("unreadable" in r.getMessage() and "/6 " in r.getMessage() for r in caplog.records)


def test_abandoned_reads_are_discarded_quietly(monkeypatch):
    """What a failed restore leaves: read coroutines suspended in an await, which turn the
    GeneratorExit of their finalisation into an error (as orbax's array reads do)."""

    class Pending:
        def __await__(self):
            yield  # a read that has not finished

    async def read_that_reraises():
        try:
            await Pending()
        except GeneratorExit as closing:
            raise RuntimeError("Encountered error while reading array index") from closing

    def abandon(coroutine):
        coroutine.send(None)  # suspended in the await, as the others when one read fails
        cycle = {"read": coroutine}
        cycle["self"] = cycle  # reachable by the garbage collector only

    class Leftover:
        def __del__(self):
            raise ValueError("not a read")

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    gc.disable()  # no collection between here and the one under test
    try:
        abandon(read_that_reraises())
        leftover = [Leftover()]
        leftover.append(leftover)
        del leftover
        checkpointing.discard_abandoned_reads()
    finally:
        gc.enable()
    # The coroutine's error is dropped; any other error still reaches the hook.
    assert [type(u.exc_value) for u in unraisable] == [ValueError]
    assert sys.unraisablehook == unraisable.append
    gc.collect()
    assert len(unraisable) == 1  # nothing was left for a later collection


def test_refused_starts_leave_the_workdir_as_it_was(small_fashion_mnist, tmp_path):
    workdir = str(tmp_path)
    train_cmae.train_and_evaluate(tiny_config(small_fashion_mnist), workdir, stop_at_step=3)
    files = lambda: {
        p: os.path.getmtime(p)
        for p in glob.glob(f"{workdir}/**", recursive=True)
        if os.path.isfile(p)
    }
    before = files()
    # Another model: refused, not mistaken for a damaged checkpoint.
    config = tiny_config(small_fashion_mnist, total_steps=6)
    config.model.width = 48
    with pytest.raises(checkpointing.StateMismatchError, match="other shapes"):
        train_cmae.train_and_evaluate(config, workdir)
    # Another method.
    with pytest.raises(loop.StartError, match="method 'cmae'.*method is 'mae'"):
        train_cmae.train_and_evaluate(tiny_config(small_fashion_mnist, method="mae"), workdir)
    assert files() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_start_refuses_an_unwritable_workdir(tmp_path):
    os.chmod(tmp_path, 0o500)
    with pytest.raises(loop.StartError, match="Cannot write to the workdir"):
        loop.check_workdir(str(tmp_path / "run"), "cmae")


def test_start_refuses_an_unwritable_workdir_as_root(tmp_path):
    # A path below a regular file can never be created, whoever runs the test.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(loop.StartError, match="Cannot write to the workdir.*--workdir"):
        loop.check_workdir(str(blocker / "run"), "cmae")


def test_start_refuses_a_disk_too_small_for_one_checkpoint(tmp_path):
    with pytest.raises(loop.StartError, match="needs .* GiB"):
        loop.check_disk(str(tmp_path), 10**18)
    loop.check_disk(str(tmp_path), 1000)


# ---------------------------------------------------------------- Process faults (CLI)

CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from test_train import tiny_config

def get_config():
    config = tiny_config({idx!r}, total_steps={steps})
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 3
    return config
"""


def cli(config_file, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "cmae_jax.main",
        f"--config={config_file}",
        f"--workdir={workdir}",
        *extra,
    ]


def run_until(command, condition, env=None, timeout=300):
    """Starts `command`; kills it with SIGKILL once `condition()` holds. Returns whether it
    was killed (False: it ended by itself first)."""
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    process.wait(timeout=max(deadline - time.time(), 1))
    return False


def newest_logged_step(workdir):
    rows = loss_rows(workdir)
    return rows[-1]["step"] if rows else 0


def saving_now(workdir):
    return bool(glob.glob(f"{workdir}/checkpoints/*orbax-checkpoint-tmp*"))


STEPS = 30


@pytest.fixture(scope="module")
def cli_setup(small_fashion_mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    config_file = folder / "tiny.py"
    config_file.write_text(
        CONFIG_FILE.format(tests=os.path.join(REPO, "tests"), idx=small_fashion_mnist, steps=STEPS)
    )
    # One compilation for the six starts of this module: the session's compilation cache
    # (conftest's shared_compilation_cache, in os.environ) reaches every start.
    env = dict(os.environ)
    reference = str(folder / "reference")
    # Its only checkpoint is the last one, which the comparisons read (a save costs about a
    # second; the interrupted runs need the 2-step cadence, the reference does not).
    only_last = f"--config.checkpoint_every_steps={STEPS}"
    out = subprocess.run(
        cli(config_file, reference, only_last), cwd=REPO, env=env, capture_output=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return str(config_file), env, reference


def assert_same_run(workdir, reference):
    """Every logged loss (re-runs of a step included) and the final state equal the
    uninterrupted run's, bit for bit."""
    expected = logged(reference, "loss")
    rows = loss_rows(workdir)
    assert {r["step"] for r in rows} == set(range(1, STEPS + 1))
    for row in rows:
        assert row["loss"] == expected[row["step"]], row["step"]
    assert_trees_equal(restore_raw(workdir, STEPS)[0], restore_raw(reference, STEPS)[0])


def test_kills_and_sigterm_then_resume_equal_an_uninterrupted_run(cli_setup, tmp_path):
    config_file, env, reference = cli_setup
    workdir = str(tmp_path / "run")
    command = cli(config_file, workdir)
    first = random.Random(0).randrange(3, STEPS - 8)
    # kill -9 at a random step.
    assert run_until(command, lambda: newest_logged_step(workdir) >= first, env)
    # kill -9 while a checkpoint is being written (its temporary folder exists), after the
    # resumed run logged a step of its own: the second kill of a resumed run.
    resumed_at = newest_logged_step(workdir)
    assert run_until(
        command, lambda: newest_logged_step(workdir) > resumed_at and saving_now(workdir), env
    )
    assert saving_now(workdir), "the kill missed the checkpoint write"
    # SIGTERM: a checkpoint at the next step, a clean exit and the message.
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    signalled_at = newest_logged_step(workdir) + 1
    while newest_logged_step(workdir) < signalled_at and process.poll() is None:
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0
    last_line = stdout.strip().splitlines()[-1]
    saved = int(last_line.split()[2].rstrip(";"))
    assert last_line == f"saved step {saved}; run the same command to resume"
    assert signalled_at <= saved < STEPS
    assert restore_raw(workdir, saved)[1]["next_step"] == saved
    # The last start runs to the end.
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(workdir, reference)


MULTIHOST_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from test_multihost import multihost_config

def get_config():
    config = multihost_config({idx!r})
    config.total_steps = 100000  # runs until killed
    config.checkpoint_every_steps = 1000
    return config
"""


def test_a_lost_process_ends_the_others_within_the_bound(small_fashion_mnist, tmp_path):
    config_file = tmp_path / "multihost.py"
    config_file.write_text(
        MULTIHOST_CONFIG.format(tests=os.path.join(REPO, "tests"), idx=small_fashion_mnist)
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from test_multihost import XLA_FLAGS

    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS)
    workdir = str(tmp_path / "run")
    processes = [
        subprocess.Popen(
            cli(
                config_file,
                workdir,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--heartbeat_timeout_seconds=10",
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.time() + 300
        while newest_logged_step(workdir) < 3 and time.time() < deadline:
            assert all(p.poll() is None for p in processes), processes[0].stderr.read()[-3000:]
            time.sleep(0.01)
        killed_at = time.time()
        processes[1].send_signal(signal.SIGKILL)
        _, stderr = processes[0].communicate(timeout=120)  # the bound: 10 s heartbeats
        elapsed = time.time() - killed_at
    finally:
        for p in processes:
            p.kill()
    assert processes[0].returncode != 0
    assert elapsed < 120
    assert "Lost process 1" in stderr or ("unhealthy" in stderr and "1" in stderr), stderr[-3000:]


def test_guard_defaults_are_documented():
    from cmae_jax.config_defaults import base_config

    guard = base_config().guard
    assert guard.max_consecutive_skips >= 1 and guard.max_rollbacks >= 1
    assert tuple(guard.poison_batches) == ()
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert "## Faults and recovery" in readme
    for name in ("max_consecutive_skips", "max_rollbacks", "poison_batches"):
        assert name in readme
