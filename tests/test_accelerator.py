"""The accelerator description and the Colab install plan (no pip is run here)."""

import sys
import types

from cmae_jax import accelerator


def test_describes_this_machines_backend():
    import jax

    line = accelerator.describe()
    assert line.startswith("JAX uses")
    if jax.default_backend() == "cpu":
        assert "no GPU or TPU" in line


def test_names_gpu_and_tpu_devices():
    gpus = [types.SimpleNamespace(device_kind="Tesla T4")]
    assert accelerator.describe_devices("gpu", gpus) == "JAX uses 1 x Tesla T4 (GPU)."
    tpus = [types.SimpleNamespace(device_kind="TPU v2")] * 8
    assert accelerator.describe_devices("tpu", tpus) == "JAX uses 8 x TPU v2 (TPU)."


def test_detects_hardware_from_device_nodes_and_variables(tmp_path):
    none = lambda name: None
    assert accelerator.detect_hardware({}, none, str(tmp_path)) == "cpu"
    colab_tpu = {"COLAB_TPU_ADDR": "10.0.0.2:8470"}
    assert accelerator.detect_hardware(colab_tpu, none, str(tmp_path)) == "tpu"
    assert accelerator.detect_hardware({}, lambda name: "/usr/bin/" + name, str(tmp_path)) == "gpu"
    (tmp_path / "accel0").touch()
    assert accelerator.detect_hardware({}, none, str(tmp_path)) == "tpu"
    (tmp_path / "nvidia0").touch()
    assert accelerator.detect_hardware({}, none, str(tmp_path)) == "gpu"


REQUIRES = [
    "jax==0.10.2",
    "tensorflow-cpu==2.21.0",
    "numpy>=2.0",
    "pytest>=8.0",
    "ipykernel==7.4.0",
    'libtpu==0.0.42.*; extra == "tpu-aot"',
]


def test_install_plan_fits_jax_and_tensorflow():
    pip = [sys.executable, "-m", "pip"]
    runtime = ["tensorflow-cpu==2.21.0", "numpy>=2.0"]
    assert accelerator.install_commands("cpu", REQUIRES, full_tensorflow=False) == [
        [*pip, "install", "-q", "jax==0.10.2", *runtime]
    ]
    assert accelerator.install_commands("gpu", REQUIRES, full_tensorflow=False) == [
        [*pip, "install", "-q", "jax[cuda12]==0.10.2", *runtime]
    ]
    # Colab: its full TensorFlow would share the tensorflow package with tensorflow-cpu.
    assert accelerator.install_commands("tpu", REQUIRES, full_tensorflow=True) == [
        [*pip, "uninstall", "-q", "-y", "tensorflow"],
        [*pip, "install", "-q", "jax[tpu]==0.10.2", *runtime],
    ]


def test_the_packages_own_requirements_plan():
    from importlib import metadata

    (install,) = accelerator.install_commands(
        "gpu", metadata.requires("cmae_jax"), full_tensorflow=False
    )
    assert any(r.startswith("jax[cuda12]==") for r in install)
    assert any(r.startswith("tensorflow-cpu==") for r in install)
    assert not any(r.startswith(("ipykernel", "nbclient", "libtpu", "jax==")) for r in install)
    assert accelerator.is_installed("jax") and not accelerator.is_installed("no-such-package")
