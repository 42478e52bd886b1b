"""Two processes on 127.0.0.1 (gloo collectives) train, stop, restart and continue, with the
same numbers as one process.

Each process has 4 fake CPU devices; the mesh is FSDP over all 8 (data=1, fsdp=8), so
every parameter is split across both processes and orbax saves and restores it from both.
Each process reads its own half of every batch.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cmae_jax.methods import cmae as train_cmae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
sys.path.insert(0, TESTS)
from conftest import xla_flags  # noqa: E402
from test_train import assert_states_match, flat_arrays, restore_raw, tiny_config  # noqa: E402

XLA_FLAGS = xla_flags(host_devices=4)
TIMEOUT_S = 300


def multihost_config(idx_dir: str):
    """tiny_config (6 steps, checkpoints every 3), one block deep, FSDP over every device."""
    config = tiny_config(idx_dir)
    config.model.depth = 1  # compile time is what these runs spend
    config.model.feature_decoder_depth = 1
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.profile_steps = 1  # the last step of each run, traced by every process
    return config


def worker(process_id: int, num_processes: int, port: int, workdir: str, idx: str, stop: int):
    """One process of a run: join the others, train until `stop`, report on stdout."""
    import jax

    from cmae_jax import sharding

    sharding.initialize_distributed("auto", f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes
    results = train_cmae.train_and_evaluate(multihost_config(idx), workdir, stop_at_step=stop)
    print("HISTORY", json.dumps(results["history"]), flush=True)
    print("LOCAL_DEVICES", jax.local_device_count(), flush=True)


def run_processes(workdir: str, idx: str, stop: int, num_processes: int = 2) -> list[str]:
    """Starts the processes of one run and waits for all of them; returns their stdouts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env["XLA_FLAGS"] = XLA_FLAGS  # read when JAX starts its CPU backend
    args = [str(num_processes), str(port), workdir, idx, str(stop)]
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(i), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for i in range(num_processes)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, err[-4000:]
            outputs.append(out)
    finally:
        for proc in procs:  # a process whose partner died would wait for it: end it
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def history_of(stdout: str) -> list:
    return json.loads(re.search(r"HISTORY (.*)", stdout).group(1))


@pytest.fixture(scope="module")
def single_process_run(small_fashion_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("single"))
    results = train_cmae.train_and_evaluate(multihost_config(small_fashion_mnist), workdir)
    return workdir, results["history"]


@pytest.fixture(scope="module")
def two_process_run(small_fashion_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    first = run_processes(workdir, small_fashion_mnist, stop=3)
    second = run_processes(workdir, small_fashion_mnist, stop=6)  # restarts from step 3
    return workdir, first, second


def test_two_processes_resume_and_match_one(single_process_run, two_process_run):
    reference_dir, reference = single_process_run
    workdir, first, second = two_process_run
    for out in first + second:
        assert "LOCAL_DEVICES 4" in out
    # Every process runs every step and logs the same global losses.
    assert history_of(first[0]) == history_of(first[1])
    assert history_of(second[0]) == history_of(second[1])
    assert [s for s, _ in history_of(first[0])] == [1, 2, 3]
    assert [s for s, _ in history_of(second[0])] == [4, 5, 6]
    losses = [loss for _, loss in history_of(first[0]) + history_of(second[0])]
    np.testing.assert_allclose(losses, [loss for _, loss in reference], rtol=2e-4)

    # The checkpoint both processes wrote at step 6, read back here on one device.
    reference_state, _ = restore_raw(reference_dir, 6)
    state = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", "6", "state"), reference_state
    )
    assert_states_match(flat_arrays(state), flat_arrays(reference_state))


def test_only_process_zero_writes_logs_and_pictures(two_process_run):
    workdir, _, _ = two_process_run
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["mesh"]["fsdp"] == -1
    assert sorted(os.listdir(os.path.join(workdir, "reconstructions"))) == [
        "step_0000003.png",
        "step_0000006.png",
    ]
    # One TensorBoard file per run, both from process 0 (the others only log).
    events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
    assert len(events) == 2
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] == 6 and 3 in steps
    # Each process wrote its own trace of each run.
    for process in ("process_0", "process_1"):
        traces = [
            name
            for _, _, names in os.walk(os.path.join(workdir, "profile", process))
            for name in names
            if name.endswith(".xplane.pb")
        ]
        assert len(traces) == 2, (process, traces)


def test_distributed_start_needs_all_three_process_flags():
    from cmae_jax import sharding

    with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
        sharding.initialize_distributed("auto", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="contradicts"):
        sharding.initialize_distributed("off", "127.0.0.1:1234", 2, 0)
    with pytest.raises(ValueError, match="not one of"):
        sharding.initialize_distributed("maybe")


def test_clusters_are_detected_from_their_environment(monkeypatch):
    from cmae_jax import sharding

    for var in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    if sharding.detected_cluster() == "tpu":
        pytest.skip("this machine is a TPU VM")
    assert sharding.detected_cluster() is None
    # Nothing to join on a plain machine: 'auto' starts nothing (and touches no backend).
    assert sharding.initialize_distributed("auto") is False
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sharding.detected_cluster() is None  # a single task needs no coordinator
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert sharding.detected_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert sharding.detected_cluster() == "openmpi"


LAUNCH = os.path.join(REPO, "launch")


@pytest.mark.parametrize(
    "script, args, missing",
    [
        (
            "local_multiprocess.sh",
            ["--num_processes=2"],
            "--devices_per_process --config --workdir",
        ),
        ("tpu_vm.sh", ["create", "--name=x"], "--zone --type"),
        ("tpu_vm.sh", ["train", "--name=x", "--zone=z"], "--config --workdir"),
        ("slurm_gpu.sh", ["--nodes=2"], "--gpus_per_node --config --workdir"),
    ],
)
def test_launch_scripts_refuse_missing_arguments(script, args, missing):
    out = subprocess.run(
        ["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and missing in out.stderr
    assert "Usage" in out.stderr  # and say how to call them


def test_launch_scripts_print_their_commands():
    def dry(script, *args):
        out = subprocess.run(
            ["bash", os.path.join(LAUNCH, script), *args, "--dry_run"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    local = dry(
        "local_multiprocess.sh",
        "--num_processes=2",
        "--devices_per_process=4",
        "--config=configs/fashion_mnist_cmae.py",
        "--workdir=/tmp/w",
        "--port=4321",
    )
    for i in range(2):
        assert f"--coordinator_address=127.0.0.1:4321 --num_processes=2 --process_id={i}" in local
    assert "xla_force_host_platform_device_count=4" in local
    tpu = dry("tpu_vm.sh", "create", "--name=n", "--zone=z", "--type=v5litepod-64", "--queued")
    assert "queued-resources create n --node-id=n --zone=z --accelerator-type=v5litepod-64" in tpu
    assert "--runtime-version=v2-alpha-tpuv5-lite" in tpu
    # keep-alive: one round after a preemption re-queues, reinstalls and resumes training.
    keep = dry(
        "tpu_vm.sh",
        "keep-alive",
        "--name=n",
        "--zone=z",
        "--type=v5litepod-64",
        "--queued",
        "--spot",
        "--config=configs/cmae_vitl.py",
        "--workdir=gs://b/w",
    )
    order = [
        "queued-resources delete n --zone=z --force",
        "queued-resources create n --node-id=n",
        "(wait until the slice is READY)",
        "the requirements and the package there",
        "python3 -m cmae_jax.main --config=configs/cmae_vitl.py --workdir=gs://b/w",
    ]
    positions = [keep.find(fragment) for fragment in order]
    assert -1 not in positions and positions == sorted(positions), keep
    assert "--spot" in keep
    slurm = dry(
        "slurm_gpu.sh",
        "--nodes=4",
        "--gpus_per_node=8",
        "--config=configs/cmae_vitl.py",
        "--workdir=/shared/w",
    )
    assert "sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8" in slurm
    assert "launch/slurm_gpu.sbatch per_gpu configs/cmae_vitl.py /shared/w" in slurm


if __name__ == "__main__":
    process, count, port_arg, work, idx_dir, stop_at = sys.argv[1:]
    worker(int(process), int(count), int(port_arg), work, idx_dir, int(stop_at))
