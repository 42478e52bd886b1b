"""Compile-ahead for TPU (cmae_jax.aot): topology names, the cycle sum, and a real compile.

The compile needs libtpu (`pip install -e .[tpu-aot]`); without it that test is skipped and
the command's refusal is checked instead.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from cmae_jax import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None

# The demo config shrunk to test_train's tiny sizes, FSDP over the 4 chips.
TINY = {
    "input.global_batch_size": 32,
    "input.image_size": 16,
    "input.patch_size": 4,
    "model.variant": "Mu/4",
    "model.width": 32,
    "model.depth": 2,
    "model.num_heads": 2,
    "model.pixel_decoder_width": 32,
    "model.pixel_decoder_depth": 1,
    "model.pixel_decoder_heads": 2,
    "model.projector_hidden": 64,
    "model.projection_dim": 32,
    "mesh.data": 1,
    "mesh.fsdp": -1,
}


def aot_command(topology: str, json_out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cmae_jax.aot",
        "--config=configs/fashion_mnist_cmae.py",
        f"--topology={topology}",
        f"--json_out={json_out}",
        *(f"--config.{k}={v}" for k, v in TINY.items()),
    ]


def tiny_demo_config():
    """The config that aot_command compiles, built in Python: the demo file with TINY set."""
    from configs import fashion_mnist_cmae

    config = fashion_mnist_cmae.get_config()
    for key, value in TINY.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def test_cloud_tpu_names_map_to_slices():
    chip, name, chips = aot.parse_topology("v4-32")  # v4 counts TensorCores: 16 chips
    assert (chip.name, name, chips) == ("TPU v4", "v4:2x2x4", 16)
    assert aot.parse_topology("v5e-64")[1:] == ("v5e:8x8", 64)
    assert aot.parse_topology("v5litepod-16")[1:] == ("v5e:4x4", 16)
    assert aot.parse_topology("v5p-128")[1:] == ("v5p:4x4x4", 64)
    assert aot.parse_topology("v6e:4x8")[1:] == ("v6e:4x8", 32)
    for bad in ("v5e-3", "v4-33", "v9-8", "tpu"):
        with pytest.raises(ValueError, match="Unknown TPU topology"):
            aot.parse_topology(bad)


def test_cycle_sum_counts_loop_bodies_by_trip_count():
    fusion = "fusion(%x), kind=kLoop, calls=%fused, backend_config="
    hlo = "\n".join(
        [
            "%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
            "  %f = f32[8] " + fusion + '{"estimated_cycles":"100"}',
            "}",
            "%fused (a: f32[8]) -> f32[8] {",
            "  %m = f32[8] multiply(%a, %a)",
            "}",
            "ENTRY %main (x: f32[8]) -> f32[8] {",
            '  %c = f32[8] copy(%x), backend_config={"estimated_cycles":"7"}',
            "  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body.1, "
            'backend_config={"known_trip_count":{"n":"12"}}',
            "  %g = f32[8] " + fusion + '{"estimated_cycles":"3"}',
            "}",
        ]
    )
    assert aot.estimated_cycles(hlo) == 7 + 12 * 100 + 3


def test_model_flops_of_vit_b_cmae():
    from configs import cmae_vitb

    config = cmae_vitb.get_config()
    config.input.global_batch_size = 1
    flops = aot.model_flops_per_step(config)

    # By hand: encoder on 69 visible tokens (x3 for forward + backward), the target encoder
    # on all 197 (forward only), 8 + 2 decoder blocks of width 512 on 197 tokens (x3).
    def vit(tokens, width, depth):
        return depth * (tokens * 2 * 12 * width**2 + 4 * tokens**2 * width)

    by_hand = 3 * vit(69, 768, 12) + vit(197, 768, 12) + 3 * vit(197, 512, 10)
    assert by_hand < flops < 1.05 * by_hand  # the rest: embeddings, prediction layers, heads


@pytest.mark.skipif(HAVE_LIBTPU, reason="libtpu is installed: the compile test runs instead")
def test_without_libtpu_the_command_says_how_to_install_it(tmp_path):
    out = subprocess.run(
        aot_command("v5e:2x2", str(tmp_path / "r.json")),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 2
    assert "pip install -e .[tpu-aot]" in out.stderr


@pytest.mark.skipif(
    not HAVE_LIBTPU, reason="libtpu is not installed (optional extra: pip install -e .[tpu-aot])"
)
def test_compiles_the_train_step_for_a_v5e_slice(tmp_path):
    import flax.linen as nn
    import jax

    json_out = str(tmp_path / "results.json")
    out = subprocess.run(
        aot_command("v5e:2x2", json_out), capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "| CMAE Mu/4 | v5e:2x2 | 1, 4, 1 |" in out.stdout
    with open(json_out) as f:
        (r,) = json.load(f)
    assert r["chips"] == r["devices"] == 4 and r["chip"] == "TPU v5e" and r["fits"]

    # Arguments per chip hold at least a quarter of the train state and of the batch (FSDP
    # over 4 chips). At this size TPU tile padding of the ~300 small leaves dominates, so
    # no tighter bound: test_sharding checks the shard shapes themselves.
    from cmae_jax.methods import cmae as train_cmae

    config = tiny_demo_config()
    model, tx, _, _ = train_cmae.make_model_and_optimizer(config, 16, 6)
    init = train_cmae.make_init_state(model, tx, config)
    state = jax.eval_shape(lambda k: nn.meta.unbox(init(k)), jax.random.key(0))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    batch_bytes = 32 * (2 * 16 * 16 * 4 + (16 + 2) * 4)  # two views, 16 ids, label, index
    arguments = r["memory_parts_gib"]["arguments"] * 2**30
    assert arguments >= (state_bytes + batch_bytes) / 4
    assert r["memory_gib"] * 2**30 > arguments

    # The compiler's FLOPs include what the analytic count leaves out (norms, softmax,
    # the optimiser), but the matmuls dominate even at this size.
    assert 1.0 < r["compiled_tflops_per_step"] / r["model_tflops_per_step"] < 2.0
    assert r["model_tflops_per_step"] * 1e12 == pytest.approx(aot.model_flops_per_step(config))
    assert r["step_ms"] > 0
    assert r["images_per_s"] == pytest.approx(32 / (r["step_ms"] / 1e3))
    assert r["mfu"] == pytest.approx(
        r["model_tflops_per_step"] * 1e12 / (r["step_ms"] / 1e3 * 4 * 197e12)
    )
