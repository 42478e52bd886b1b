"""The attached accelerator: what JAX runs on, in words, and the jax build it needs.

`describe()` names the devices JAX uses (the notebooks print it first). Before JAX is set
up, e.g. in a fresh Colab runtime, `detect_hardware()` looks at the machine itself, and after
`pip install --no-deps cmae_jax`, `python -m cmae_jax.accelerator --install` installs the
package's requirements with the jax build for it (the CUDA plugin on a GPU, libtpu on a
TPU) at the pinned jax version, replacing a full TensorFlow by the CPU build the input
pipeline uses and leaving the runtime's own Jupyter packages alone.

  python -m cmae_jax.accelerator            # prints what JAX runs on
  python -m cmae_jax.accelerator --install  # a notebook runtime's setup (pip)
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

# jax's pip extra for each kind of hardware (None: the plain CPU wheels).
JAX_EXTRAS = {"gpu": "cuda12", "tpu": "tpu", "cpu": None}


def describe_devices(backend: str, devices: Sequence[Any]) -> str:
    """One line naming `devices` (jax.Device-like: platform, device_kind) of `backend`."""
    kinds = sorted({str(d.device_kind) for d in devices})
    count = len(devices)
    if backend == "cpu":
        return (
            f"JAX uses the CPU ({count} device{'s' if count != 1 else ''}, "
            f"{os.cpu_count()} cores): no GPU or TPU is attached. In Colab: Runtime > "
            "Change runtime type."
        )
    return f"JAX uses {count} x {' / '.join(kinds)} ({backend.upper()})."


def describe() -> str:
    """One line naming the accelerator JAX uses here (initialises JAX's backend)."""
    import jax

    return describe_devices(jax.default_backend(), jax.devices())


def detect_hardware(
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    dev: str = "/dev",
) -> str:
    """'gpu', 'tpu' or 'cpu': the attached accelerator, found without importing JAX.

    A GPU: an NVIDIA device node or nvidia-smi. A TPU: a TPU VM's device nodes (accel*,
    vfio) or the TPU variables that Colab and Cloud TPU VMs set.
    """
    environ = os.environ if environ is None else environ
    if glob.glob(os.path.join(dev, "nvidia[0-9]*")) or which("nvidia-smi"):
        return "gpu"
    tpu_nodes = glob.glob(os.path.join(dev, "accel[0-9]*")) + glob.glob(
        os.path.join(dev, "vfio", "[0-9]*")
    )
    if tpu_nodes or environ.get("TPU_ACCELERATOR_TYPE") or environ.get("COLAB_TPU_ADDR"):
        return "tpu"
    return "cpu"


# Requirements of the package that a notebook runtime has its own versions of, and that only
# the tests need (executing notebooks): Colab's kernel must keep its ipykernel.
NOTEBOOK_RUNTIME_PACKAGES = ("ipykernel", "nbclient", "nbformat", "pytest")


def jax_requirement(hardware: str, version_spec: str) -> str:
    """The pip requirement of jax `version_spec` for `hardware`, e.g. 'jax[cuda12]==0.10.2'."""
    extra = JAX_EXTRAS[hardware]
    return f"jax[{extra}]{version_spec}" if extra else f"jax{version_spec}"


def install_commands(
    hardware: str, requires: Sequence[str], *, full_tensorflow: bool
) -> list[list[str]]:
    """The pip commands that set up a notebook runtime where cmae_jax was installed without
    its dependencies: a full TensorFlow (Colab's) makes way for the pinned tensorflow-cpu,
    then cmae_jax's `requires` (its metadata's requirement strings, optional extras and
    NOTEBOOK_RUNTIME_PACKAGES left out) with the jax build for `hardware`, in one resolve.
    `full_tensorflow`: whether the 'tensorflow' distribution is installed."""
    from packaging.requirements import Requirement

    wanted = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is not None or requirement.name in NOTEBOOK_RUNTIME_PACKAGES:
            continue
        if requirement.name == "jax":
            line = jax_requirement(hardware, str(requirement.specifier))
        wanted.append(line)
    commands = []
    if full_tensorflow:
        commands.append([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "tensorflow"])
    commands.append([sys.executable, "-m", "pip", "install", "-q", *wanted])
    return commands


def is_installed(distribution: str) -> bool:
    """Whether the distribution (pip's name) is installed."""
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """Prints what JAX uses; with --install first installs cmae_jax's requirements with the
    jax build for the hardware (after `pip install --no-deps cmae_jax`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--install",
        action="store_true",
        help="install the requirements, with the jax build the hardware needs",
    )
    args = parser.parse_args(argv)
    if args.install:
        hardware = detect_hardware()
        print(f"Hardware: {hardware}", flush=True)
        requires = metadata.requires("cmae_jax") or []
        full_tensorflow = is_installed("tensorflow")
        for command in install_commands(hardware, requires, full_tensorflow=full_tensorflow):
            print(" ".join(command[1:]), flush=True)
            subprocess.run(command, check=True)
        # A fresh process: this one has not loaded the jax build just installed.
        subprocess.run([sys.executable, "-m", "cmae_jax.accelerator"], check=True)
        return
    print(describe())


if __name__ == "__main__":
    main()
