"""Sharded training on 8 fake CPU devices equals 1 device; shardings follow the rules.

One subprocess (8 fake devices, so the pytest process keeps its single device) runs the
CMAE train step on a 1-device mesh and on each test mesh from the same initial state and
the same synthetic batches, and saves losses, gradients (the first step's, from Adam's
first moment), parameter changes, shard shapes and the InfoNCE logits' per-device shape;
the tests compare them. A second subprocess, with XLA's CSE pass off, runs the conv stem on
a mesh that splits the batch and `tensor` (see `stem_tensor_runs`).
"""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import xla_flags

from cmae_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)]
STEPS = 3
BATCH = 32


def mesh_name(sizes) -> str:
    return "x".join(str(s) for s in sizes)


def synthetic_config():
    """tiny_config of test_train (width 32, 2 heads, batch 32), one block deep, peak lr."""
    sys.path.insert(0, TESTS)
    from test_train import tiny_config

    config = tiny_config("/nonexistent")
    # One block per transformer: compile time is what this file spends.
    config.model.depth = 1
    config.model.feature_decoder_depth = 1
    config.optimizer.warmup_epochs = 0.0
    config.optimizer.base_lr = 1e-2
    # The papers' linear patch embedding on every mesh; the conv stem has its own run below.
    config.model.stem_channels = 0
    return config


def synthetic_batches(config, num: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random views and random masks shaped like the input pipeline's batches."""
    from cmae_jax.data import masking

    rng = np.random.default_rng(seed)
    size, channels = config.input.image_size, config.input.channels
    grid = size // config.input.patch_size
    keep, _ = masking.mask_counts(grid, config.input)
    b = config.input.global_batch_size
    batches = []
    for _ in range(num):
        order = np.argsort(rng.random((b, grid * grid)), axis=1)
        batches.append(
            {
                "online": rng.standard_normal((b, size, size, channels)).astype(np.float32),
                "target": rng.standard_normal((b, size, size, channels)).astype(np.float32),
                "ids_keep": np.sort(order[:, :keep], axis=1).astype(np.int32),
                "ids_mask": np.sort(order[:, keep:], axis=1).astype(np.int32),
                "label": np.zeros(b, np.int32),
                "index": np.arange(b, dtype=np.int32),
            }
        )
    return batches


class MeshRun:
    """One mesh's state, batches and lowered programs; compiled later, then run."""

    def __init__(self, config, sizes, devices, host_state, batches):
        import flax.linen as nn

        from cmae_jax import losses, train_state
        from cmae_jax.methods import cmae as train_cmae

        self.sizes = sizes
        mesh_cfg = ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, sizes)))
        self.mesh = sharding.make_mesh(mesh_cfg, devices)
        rules = sharding.logical_axis_rules(config.logical_axis_rules)
        model, tx, lr, momentum = train_cmae.make_model_and_optimizer(config, 16, 2 * STEPS)
        init = train_cmae.make_init_state(model, tx, config)
        # The layout the rules give (what create_sharded_state computes in place); the
        # values are the 1-device reference's, so every mesh starts from the same state.
        shardings, _ = train_state.abstract_sharded_state(init, jax.random.key(0), self.mesh, rules)
        self.state = jax.device_put(host_state, shardings)
        self.b1 = config.optimizer.b1
        batch_sharding = sharding.batch_sharding(self.mesh)
        self.batches = [jax.device_put(b, batch_sharding) for b in batches]
        step = train_cmae.jit_train_step(model, config, tx, lr, momentum, shardings, self.mesh)
        info_nce = jax.jit(lambda q, k: losses.info_nce(q, k, 0.07))
        q = jax.device_put(np.ones((BATCH, 8), np.float32), batch_sharding)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
            self.lowered = [step.lower(self.state, self.batches[0]), info_nce.lower(q, q)]

    def run(self) -> dict[str, np.ndarray]:
        """STEPS train steps; the first one's losses and gradients; flat results by kind/path."""
        import optax

        step, info_nce = [lowered.compile() for lowered in self.lowered]
        state = self.state
        out = flat("shard", state, lambda leaf: shard_shapes(leaf))
        initial = jax.tree.map(np.asarray, state.params)
        step_losses = []
        for i, batch in enumerate(self.batches):
            state, metrics = step(state, batch)
            step_losses.append(float(metrics["loss"]))
            if i == 0:
                # The losses of the first batch (total, reconstruction, InfoNCE) and, as
                # Adam's first moment after one step from zero is (1 - b1) x the gradient,
                # its gradients: the step's own, so no second program to compile per mesh.
                parts = ("loss", "reconstruction_loss", "contrastive_loss")
                out["first_loss"] = np.asarray([float(metrics[k]) for k in parts])
                mu = jax.tree.map(np.asarray, optax.tree_utils.tree_get(state.opt_state, "mu"))
                out.update(flat("mu1", mu))
                out.update(flat("grad", jax.tree.map(lambda m: m / (1 - self.b1), mu)))
        out["losses"] = np.asarray(step_losses)
        out.update(
            flat("delta", jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, initial))
        )
        hlo = info_nce.as_text()
        rows, cols = BATCH // (self.sizes[0] * self.sizes[1]), BATCH // self.sizes[2]
        out["logits_whole"] = np.asarray(f"f32[{BATCH},{BATCH}]" in hlo)
        out["logits_local"] = np.asarray(f"f32[{rows},{cols}]" in hlo)
        return out


def shard_shapes(leaf: jax.Array) -> np.ndarray:
    """[global shape, the one shape of every addressable shard]."""
    shapes = {tuple(s.data.shape) for s in leaf.addressable_shards}
    assert len(shapes) == 1, shapes
    return np.array([leaf.shape, shapes.pop()], np.int64)


def flat(kind: str, tree, fn=np.asarray) -> dict[str, np.ndarray]:
    """{kind + path: fn(leaf)} over a tree."""
    return {
        kind + jax.tree_util.keystr(path): fn(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def stack_blocks(tree):
    """Unrolled block_0 .. block_{d-1} subtrees -> one 'blocks' subtree stacked on axis 0."""

    def is_stack(x):
        return isinstance(x, dict) and "block_0" in x

    def stack(module):
        depth = sum(k.startswith("block_") for k in module)
        rest = {k: stack_blocks(v) for k, v in module.items() if not k.startswith("block_")}
        blocks = [module[f"block_{i}"] for i in range(depth)]
        return {**rest, "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}

    return jax.tree.map(lambda x: stack(x) if is_stack(x) else x, tree, is_leaf=is_stack)


def one_device_mesh() -> jax.sharding.Mesh:
    """The 1-device mesh of the references."""
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=1)), jax.devices()[:1])


def initial_state(config):
    """(model, state): the CMAE model of `config` and its initial train state on one device."""
    from cmae_jax import train_state
    from cmae_jax.methods import cmae as train_cmae

    one = one_device_mesh()
    rules = sharding.logical_axis_rules(config.logical_axis_rules)
    model, tx, _, _ = train_cmae.make_model_and_optimizer(config, 16, 2 * STEPS)
    init = train_cmae.make_init_state(model, tx, config)
    state, _, _ = train_state.create_sharded_state(init, jax.random.key(0), one, rules)
    return model, state


def stem_config():
    """synthetic_config with the CMAE demo's conv stem."""
    config = synthetic_config()
    config.model.stem_channels = 16
    return config


def worker(out_dir: str, runs: str) -> None:
    """Runs in an 8-device subprocess. runs='meshes': the reference on one device, then
    every mesh; runs='stem_tensor': the conv stem on one device and on 4x1x2."""
    import flax.linen as nn

    from cmae_jax import ema
    from cmae_jax.methods import cmae as train_cmae

    assert jax.device_count() == 8, jax.devices()

    def save(name, results):
        np.savez(os.path.join(out_dir, f"{name}.npz"), **results)

    config = synthetic_config()
    batches = synthetic_batches(config, STEPS)
    if runs == "stem_tensor":
        stem = stem_config()
        stem_host = jax.tree.map(np.asarray, initial_state(stem)[1])
        save("stem_1x1x1", MeshRun(stem, (1, 1, 1), jax.devices()[:1], stem_host, batches).run())
        save("stem_4x1x2", MeshRun(stem, (4, 1, 2), jax.devices(), stem_host, batches).run())
        return

    one = one_device_mesh()
    rules = sharding.logical_axis_rules(config.logical_axis_rules)
    model, state = initial_state(config)
    host_state = jax.tree.map(np.asarray, state)

    save("1x1x1", MeshRun(config, (1, 1, 1), jax.devices()[:1], host_state, batches).run())
    for sizes in MESHES:
        save(mesh_name(sizes), MeshRun(config, sizes, jax.devices(), host_state, batches).run())

    # Scan over layers with remat on the 3-axis mesh, from the same (stacked) state.
    scan = synthetic_config()
    scan.model.scan_layers = True
    scan.model.remat = "save_dots"
    results = MeshRun(scan, (2, 2, 2), jax.devices(), stack_blocks(host_state), batches).run()
    # Back to the unrolled names (depth 1) to compare with the reference.
    save(
        "scan",
        {
            k if k.startswith("shard") else k.replace("['blocks']", "['block_0']"): (
                v[0] if "['blocks']" in k and not k.startswith("shard") else v
            )
            for k, v in results.items()
        },
    )

    # Gradient accumulation over 2 micro-batches (rows 0::2 and 1::2) on 2x4x1, and the
    # 1-device reference: each micro-batch's losses and gradients on its own, averaged.
    accum = synthetic_config()
    accum.grad_accumulation_steps = 2
    save("accum", MeshRun(accum, (2, 4, 1), jax.devices(), host_state, batches).run())
    gradients = jax.jit(train_cmae.make_batch_gradients(model, config))
    target = ema.target_params(state.opt_state)
    with jax.set_mesh(one), nn.logical_axis_rules(rules):
        micro = []
        for i in range(2):
            rows = {k: v[i::2] for k, v in batches[0].items()}
            micro.append(gradients(state.params, state.batch_stats, target, rows))
    mean = lambda a, b: (np.asarray(a) + np.asarray(b)) / 2
    save(
        "micro",
        {
            "first_loss": mean(micro[0][1], micro[1][1]),
            **flat("grad", jax.tree.map(mean, micro[0][0], micro[1][0])),
        },
    )

    # The conv stem (the CMAE demo's) on a mesh that splits the batch over data and FSDP,
    # against its own 1-device reference (with the tensor axis split too: `stem_tensor_runs`).
    stem = stem_config()
    stem_host = jax.tree.map(np.asarray, initial_state(stem)[1])
    save("stem_1x1x1", MeshRun(stem, (1, 1, 1), jax.devices()[:1], stem_host, batches).run())
    save("stem", MeshRun(stem, (2, 4, 1), jax.devices(), stem_host, batches).run())


def run_worker(out_dir: str, runs: str, names: list[str], extra_xla_flags: str = "") -> dict:
    """Runs `worker(out_dir, runs)` in an 8-device subprocess; its saved results by name."""
    env = dict(os.environ, XLA_FLAGS=f"{xla_flags(host_devices=8)} {extra_xla_flags}")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), out_dir, runs],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: dict(np.load(os.path.join(out_dir, f"{name}.npz"))) for name in names}


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    names = ["1x1x1", *map(mesh_name, MESHES), "scan", "accum", "micro", "stem_1x1x1", "stem"]
    return run_worker(str(tmp_path_factory.mktemp("mesh_runs")), "meshes", names)


# With the conv stem, the CMAE step on a mesh that splits both the batch and the tensor
# axis (4x1x2, 2x2x2) comes out of XLA's CPU compiler (jax 0.10.2) with contrastive-branch
# gradients 1-8% off one device's and off a float64 reference, while one device agrees
# with that reference to 6e-5; with XLA's common-subexpression pass off
# (--xla_disable_hlo_passes=cse) the same program agrees. A compiler fault, not this
# code's sharding: config_validation refuses the combination, and this run (CSE off)
# keeps checking that the program itself is right on such a mesh.
@pytest.fixture(scope="module")
def stem_tensor_runs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("stem_tensor_runs"))
    names = ["stem_1x1x1", "stem_4x1x2"]
    return run_worker(out_dir, "stem_tensor", names, "--xla_disable_hlo_passes=cse")


def assert_gradients_close(run: dict, ref: dict, kind: str = "grad", scale: float = 1.0):
    """run[kind + path] * scale equals ref['grad' + path] for every parameter, to rounding.

    Float reassociation of partial sums only: BatchNorm statistics and InfoNCE negatives are
    global-batch quantities on every mesh. Some gradients are zero in exact arithmetic
    (biases right before a BatchNorm or a pooled LayerNorm, attention's key bias): there
    only rounding noise remains, hence the absolute term.
    """
    grads = [k for k in ref if k.startswith("grad")]
    assert len(grads) > 40
    global_norm = np.sqrt(sum(np.sum(np.square(ref[k])) for k in grads))
    for key in grads:
        error = np.linalg.norm(run[kind + key[len("grad") :]] * scale - ref[key])
        assert error <= 1e-4 * np.linalg.norm(ref[key]) + 1e-6 * global_norm, key
    return global_norm


@pytest.mark.parametrize("sizes", [*MESHES, "scan"], ids=str)
def test_mesh_matches_one_device(mesh_runs, sizes):
    # "scan": the 2x2x2 mesh with nn.scan over the blocks and remat 'save_dots'.
    ref, run = mesh_runs["1x1x1"], mesh_runs[sizes if sizes == "scan" else mesh_name(sizes)]
    # Losses of the first batch (total, reconstruction, InfoNCE) and of each step.
    np.testing.assert_allclose(run["first_loss"], ref["first_loss"], rtol=1e-5)
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-4)
    assert ref["first_loss"][2] > 0.1  # the InfoNCE term is really there
    global_norm = assert_gradients_close(run, ref)
    for key in (k for k in ref if k.startswith("delta")):
        # After STEPS Adam steps, per leaf. Adam turns rounding noise in an exactly-zero
        # gradient into a full-size step of random sign, so those elements are left out.
        live = np.abs(ref["grad" + key[len("delta") :]]) > 1e-6 * global_norm
        if live.any():
            moved = np.linalg.norm(ref[key][live])
            assert moved > 0, key
            assert np.linalg.norm((run[key] - ref[key])[live]) < 1e-3 * moved, key


def assert_stem_step_matches(run: dict, ref: dict) -> None:
    """The conv stem's run equals its 1-device reference: losses and first gradients."""
    assert any("['stem_conv1']" in key for key in ref)
    np.testing.assert_allclose(run["first_loss"], ref["first_loss"], rtol=1e-5)
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-4)
    assert_gradients_close(run, ref)


def test_the_conv_stem_step_matches_one_device_on_a_data_and_fsdp_mesh(mesh_runs):
    assert_stem_step_matches(mesh_runs["stem"], mesh_runs["stem_1x1x1"])


def test_the_conv_stem_step_matches_one_device_on_a_tensor_mesh_with_xla_cse_off(
    stem_tensor_runs,
):
    assert_stem_step_matches(stem_tensor_runs["stem_4x1x2"], stem_tensor_runs["stem_1x1x1"])


def test_scanned_blocks_stack_along_an_unsplit_layers_axis(mesh_runs):
    shapes = mesh_runs["scan"]["shard.params['encoder']['blocks']['attn']['qkv']['kernel']"]
    assert tuple(shapes[0]) == (1, 32, 3, 2, 16) and tuple(shapes[1]) == (1, 16, 3, 1, 16)


def test_gradient_accumulation_averages_micro_batches(mesh_runs):
    run, micro, full = mesh_runs["accum"], mesh_runs["micro"], mesh_runs["1x1x1"]
    # The step's loss and gradient are the means over the two micro-batches, each a CMAE
    # batch of its own (16 InfoNCE negatives, its own BatchNorm statistics).
    np.testing.assert_allclose(run["losses"][0], micro["first_loss"][0], rtol=1e-5)
    assert_gradients_close(run, micro, kind="mu1", scale=1 / 0.1)  # mu = (1 - b1) * grad
    # ... which is not the full batch's contrastive loss (32 negatives).
    assert abs(micro["first_loss"][2] - full["first_loss"][2]) > 1e-3


def test_fsdp_holds_one_eighth_of_every_matrix(mesh_runs):
    run = mesh_runs["1x8x1"]
    matrices = {k: v for k, v in run.items() if k.startswith("shard") and k.endswith("['kernel']")}
    # Online parameters, both Adam moments and the EMA target, heads included.
    for part in (".params['encoder']", ".mu['encoder']", ".nu['encoder']", ".target['encoder']"):
        assert sum(part in k for k in matrices) == 5, part  # embedding, qkv, proj, fc1, fc2
    assert any(".params['predictor']['dense_0']" in k for k in matrices)
    for key, (global_shape, shard_shape) in matrices.items():
        assert np.prod(shard_shape) * 8 == np.prod(global_shape), (key, global_shape, shard_shape)
    # Vectors along the model width are split too; the step counter is replicated.
    bias = run["shard.params['encoder']['block_0']['mlp']['fc2']['bias']"]
    assert tuple(bias[1]) == (4,)
    assert tuple(run["shard.step"][1]) == ()


def test_tensor_and_fsdp_axes_split_the_named_dimensions(mesh_runs):
    run = mesh_runs["2x2x2"]  # fsdp 2 splits the width, tensor 2 heads and MLP hidden
    block = ".params['encoder']['block_0']"
    expected = {
        "['attn']['qkv']['kernel']": ((32, 3, 2, 16), (16, 3, 1, 16)),
        "['attn']['proj']['kernel']": ((2, 16, 32), (1, 16, 16)),
        "['mlp']['fc1']['kernel']": ((32, 128), (16, 64)),
        "['mlp']['fc2']['kernel']": ((128, 32), (64, 16)),
    }
    for name, (global_shape, shard_shape) in expected.items():
        shapes = run[f"shard{block}{name}"]
        assert tuple(shapes[0]) == global_shape and tuple(shapes[1]) == shard_shape, name


@pytest.mark.parametrize("sizes", MESHES, ids=mesh_name)
def test_infonce_logits_are_never_whole_on_a_device(mesh_runs, sizes):
    run = mesh_runs[mesh_name(sizes)]
    # The compiled per-device program holds a [B/(data*fsdp), B/tensor] block of the logits.
    assert bool(run["logits_local"]) and not bool(run["logits_whole"])


def test_mesh_shape_fills_in_the_rest_and_rejects_bad_sizes():
    cfg = ml_collections.ConfigDict(dict(data=2, fsdp=-1, tensor=2))
    assert sharding.mesh_shape(cfg, 16) == (2, 4, 2)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape(ml_collections.ConfigDict(dict(data=3, fsdp=-1, tensor=1)), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1)), 8)


def test_config_rules_override_defaults_by_name():
    rules = dict(sharding.logical_axis_rules([["embed", None], ["mlp", ["tensor"]]]))
    assert rules["embed"] is None and rules["mlp"] == "tensor"
    assert rules["batch"] == ("data", "fsdp") and rules["heads"] == "tensor"
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        sharding.logical_axis_rules([["embed", "model"]])


def test_undividable_dimension_stays_whole():
    mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    spec = jax.sharding.PartitionSpec("fsdp", "tensor")
    assert sharding.fit_spec(spec, (8, 3), mesh) == jax.sharding.PartitionSpec("fsdp", None)
    assert sharding.fit_spec(spec, (6, 4), mesh) == jax.sharding.PartitionSpec(None, "tensor")
    assert sharding.fit_spec(spec, (8, 4), mesh) == spec
    assert sharding.fit_spec(jax.sharding.PartitionSpec(("data", "fsdp")), (4, 5), mesh) == (
        jax.sharding.PartitionSpec(("data", "fsdp"), None)
    )


@pytest.mark.parametrize(
    "remat, policy",
    [
        ("none", None),
        ("full", None),
        ("save_dots", jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
        (True, None),  # the older boolean setting means 'full'
    ],
)
def test_remat_policy_wraps_every_block(remat, policy):
    import flax.linen as nn
    import jax.numpy as jnp

    from cmae_jax.models import vit

    images = jnp.zeros((2, 8, 8, 1), jnp.float32)
    encoder = vit.Encoder(width=8, depth=3, num_heads=2, mlp_dim=16, patch_size=4, remat=remat)
    params = nn.meta.unbox(jax.eval_shape(encoder.init, jax.random.key(0), images)["params"])
    loss = lambda p: jnp.mean(encoder.apply({"params": p}, images).tokens ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    # Rematerialised regions are the equations that carry a policy and prevent_cse.
    regions = [e.params["policy"] for e in jaxpr.eqns if {"policy", "prevent_cse"} <= set(e.params)]
    assert regions == ([] if remat == "none" else [policy] * 3)


def test_unknown_remat_policy_is_refused():
    from cmae_jax.models import cmae, vit

    assert vit.remat_policy_name(False) == "none"
    model_cfg = ml_collections.ConfigDict(dict(variant="Ti/4", remat="some"))
    with pytest.raises(ValueError, match="config.model.remat='some'"):
        cmae.build_model(model_cfg, ml_collections.ConfigDict(dict(patch_size=4)))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
