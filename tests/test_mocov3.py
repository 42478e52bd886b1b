"""MoCo v3: the loss against a hand computation, the momentum schedule against the official
formula, the heads' structure, the frozen patch projection, the momentum branch after a
step, and a tiny run through the loop that resumes exactly."""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_config import load_config
from test_train import REPO, assert_trees_equal, restore_raw, tiny_vit

from cmae_jax import config_validation, ema, methods, optim
from cmae_jax.config_checks import ConfigError
from cmae_jax.config_defaults import base_config
from cmae_jax.data import pipeline, sources
from cmae_jax.methods import mocov3
from cmae_jax.models import cmae as cmae_model
from cmae_jax.models import mocov3 as mocov3_model


def shipped_config(name: str) -> ml_collections.ConfigDict:
    """The config of configs/<name>."""
    return load_config(os.path.join(REPO, "configs", name))


def tiny_config(idx_dir: str, total_steps: int = 6) -> ml_collections.ConfigDict:
    """The Fashion-MNIST demo shrunk until a step takes milliseconds on a CPU core."""
    config = tiny_vit(shipped_config("fashion_mnist_mocov3.py"))
    config.dataset.idx_dir = idx_dir
    config.input.global_batch_size = 32
    config.mocov3.projector_hidden = 64
    config.mocov3.predictor_hidden = 64
    config.mocov3.projection_dim = 32
    config.optimizer.warmup_epochs = 0.1
    config.total_steps = total_steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.eval.knn = False
    config.eval.batch_size = 64
    return config


# ---------------------------------------------------------------------- Loss


def numpy_ctr(q: np.ndarray, k: np.ndarray, tau: float) -> float:
    """The official ctr: CrossEntropy(normalize(q) @ normalize(k).T / tau, arange) * 2 tau."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = (q @ k.T / tau).astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(np.diag(log_softmax)) * 2 * tau)


def test_loss_is_the_official_symmetric_ctr():
    rng = np.random.default_rng(0)
    q1, q2, k1, k2 = (rng.normal(size=(6, 5)).astype(np.float32) for _ in range(4))
    tau = 0.2
    loss = float(mocov3.contrastive_loss((q1, q2), (k1, k2), tau))
    expected = numpy_ctr(q1, k2, tau) + numpy_ctr(q2, k1, tau)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Query 1 meets the keys of view 2: pairing each view with its own keys is another number.
    assert abs(loss - (numpy_ctr(q1, k1, tau) + numpy_ctr(q2, k2, tau))) > 1e-3
    # Swapping the two views changes nothing (the loss is symmetric).
    np.testing.assert_allclose(
        float(mocov3.contrastive_loss((q2, q1), (k2, k1), tau)), loss, rtol=1e-6
    )
    # The keys get no gradient.
    grad_keys = jax.grad(lambda k: mocov3.contrastive_loss((q1, q2), (k, k2), tau))(k1)
    np.testing.assert_array_equal(grad_keys, 0.0)


# ---------------------------------------------------------------------- Momentum


def test_momentum_copy_follows_the_official_schedule():
    base, total = 0.99, 50
    schedule = ema.momentum_schedule(base, total, "cosine")
    shifted = mocov3.key_momentum(schedule)
    for k in range(total + 1):
        # main_moco.adjust_moco_momentum at epoch + i / iters_per_epoch = k / total.
        official = 1.0 - 0.5 * (1.0 + np.cos(np.pi * k / total)) * (1.0 - base)
        np.testing.assert_allclose(float(schedule(k)), official, rtol=1e-6)
        if k:
            # The EMA update after step k - 1 (count k - 1) makes the copy step k reads.
            np.testing.assert_allclose(float(shifted(k - 1)), official, rtol=1e-6)
    assert float(schedule(0)) == pytest.approx(base) and float(schedule(total)) == 1.0


# ---------------------------------------------------------------------- Model


def test_heads_and_encoder_have_the_official_structure():
    config = tiny_config("unused")
    model = mocov3_model.build_model(config.model, config.input, config.mocov3)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 1)), train=False)
    )
    params = nn.meta.unbox(variables["params"])
    # No Linear has a bias; the hidden BatchNorms have scale and bias, the last ones none.
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes["projector"] == {
        "dense_0": {"kernel": (32, 64)},
        "bn_0": {"scale": (64,), "bias": (64,)},
        "dense_1": {"kernel": (64, 64)},
        "bn_1": {"scale": (64,), "bias": (64,)},
        "dense_2": {"kernel": (64, 32)},
    }
    assert set(params["predictor"]) == {"dense_0", "bn_0", "dense_1"}
    assert set(params["predictor"]["dense_1"]) == {"kernel"}
    # The last BatchNorms still normalise: they keep running statistics.
    assert set(variables["batch_stats"]["projector"]) == {"bn_0", "bn_1", "bn_2"}
    assert set(variables["batch_stats"]["predictor"]) == {"bn_0", "bn_1"}
    # The encoder is the MAE encoder of the same config.model, leaf for leaf.
    mae = cmae_model.build_model(config.model, config.input, contrastive=False)
    mae_params = jax.eval_shape(
        lambda: mae.init(
            jax.random.key(0),
            jnp.zeros((2, 16, 16, 1)),
            jnp.zeros((2, 4), jnp.int32),
            jnp.zeros((2, 12), jnp.int32),
            train=False,
        )
    )["params"]
    assert jax.tree.structure(params["encoder"]) == jax.tree.structure(
        nn.meta.unbox(mae_params["encoder"])
    )


def test_last_batchnorm_outputs_are_standardised():
    config = tiny_config("unused")
    model = mocov3_model.build_model(config.model, config.input, config.mocov3)
    images = jax.random.normal(jax.random.key(1), (16, 16, 16, 1))
    variables = model.init(jax.random.key(0), images, train=False)
    queries, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(queries.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(queries.std(axis=0), 1.0, rtol=1e-2)


def test_weight_decay_on_every_parameter_when_asked():
    params = {"norm": {"scale": jnp.ones(3)}, "dense": {"kernel": jnp.ones((2, 2))}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    opt_cfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, weight_decay=0.1))
    for decay_all, scale_moves in ((False, False), (True, True)):
        opt_cfg.decay_all_params = decay_all
        tx = optim.adamw(opt_cfg, 0.5)
        updates, _ = tx.update(zero_grads, tx.init(params), params)
        # A zero gradient leaves only the decay: -lr * wd * param.
        np.testing.assert_allclose(updates["dense"]["kernel"], -0.05)
        np.testing.assert_allclose(updates["norm"]["scale"], -0.05 if scale_moves else 0.0)


# ---------------------------------------------------------------------- Update step


@pytest.fixture(scope="module")
def three_steps():
    """The jitted step run three times on random views from a fresh state."""
    config = tiny_config("unused")
    # A low momentum rising fast and a large lr: each step's EMA visibly depends on m(k).
    config.ema.momentum = 0.5
    config.optimizer.base_lr = 1e-2
    model, tx, schedules = mocov3.make_model_and_optimizer(config, 10, 4)
    state = nn.meta.unbox(mocov3.make_init_state(model, tx, config)(jax.random.key(0)))
    step = jax.jit(mocov3.make_train_step(model, config, tx, schedules))
    rng = np.random.default_rng(0)
    states, metrics = [state], []
    for _ in range(3):
        batch = {v: rng.normal(size=(32, 16, 16, 1)).astype(np.float32) for v in mocov3.VIEWS}
        state, m = step(state, batch)
        states.append(state)
        metrics.append(m)
    return config, model, schedules, states, metrics, batch


def test_patch_projection_stays_bit_identical(three_steps):
    _, _, _, states, metrics, _ = three_steps
    first, last = states[0].params["encoder"], states[-1].params["encoder"]
    assert_trees_equal(first["embedding"], last["embedding"])
    assert not np.array_equal(first["cls"], last["cls"])  # the rest of the encoder trains
    # It has no Adam moments and no momentum copy.
    assert "embedding" not in ema.target_params(states[-1].opt_state)["encoder"]
    adam_paths = jax.tree_util.tree_leaves_with_path(states[-1].opt_state[0])
    assert not any("embedding" in jax.tree_util.keystr(path) for path, _ in adam_paths)
    assert all(np.isfinite(float(m["loss"])) for m in metrics)


def test_momentum_branch_is_the_ema_of_the_online_one(three_steps):
    _, _, schedules, states, _, _ = three_steps
    for k in (1, 2, 3):
        m = float(schedules["ema_momentum"](k))
        before = ema.target_params(states[k - 1].opt_state)
        after = ema.target_params(states[k].opt_state)
        online = states[k].params
        for part in mocov3.MOMENTUM_KEYS:
            copied = {name: v for name, v in online[part].items() if name in before[part]}
            expected = jax.tree.map(lambda t, p, m=m: m * t + (1 - m) * p, before[part], copied)
            assert_trees_equal(after[part], expected, rtol=1e-6, atol=1e-7)
    # Before the first step the copy is the online network itself.
    target = ema.target_params(states[0].opt_state)
    assert_trees_equal(target["projector"], states[0].params["projector"])


def test_step_loss_pairs_online_queries_with_the_other_views_keys(three_steps):
    _, model, _, states, metrics, _ = three_steps
    rng = np.random.default_rng(0)
    batch = {v: rng.normal(size=(32, 16, 16, 1)).astype(np.float32) for v in mocov3.VIEWS}
    state = states[0]  # step 0: the momentum branch equals the online one
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    keys = [
        model.apply(variables, batch[v], train=True, method=model.project, mutable=True)[0]
        for v in mocov3.VIEWS
    ]
    stats, queries = state.batch_stats, []
    for v in mocov3.VIEWS:
        q, updated = model.apply(
            {"params": state.params, "batch_stats": stats},
            batch[v],
            train=True,
            mutable=["batch_stats"],
        )
        stats = updated["batch_stats"]
        queries.append(np.asarray(q))
    keys = [np.asarray(k) for k in keys]
    expected = numpy_ctr(queries[0], keys[1], 0.2) + numpy_ctr(queries[1], keys[0], 0.2)
    np.testing.assert_allclose(float(metrics[0]["loss"]), expected, rtol=1e-4)
    # The BatchNorm running averages saw both views, one after the other.
    assert_trees_equal(states[1].batch_stats, stats, rtol=1e-5, atol=1e-6)


def test_config_checks_name_the_key():
    config = tiny_config("unused")
    checks = methods.Checks(num_devices=1)
    mocov3.validate(config, checks)
    for key, value, message in [
        ("input.views", None, "config.input.views=None"),
        ("grad_accumulation_steps", 2, "config.grad_accumulation_steps=2"),
        ("loss.temperature", 0.0, "config.loss.temperature=0.0"),
        ("ema.schedule", "linear", "config.ema.schedule='linear'"),
        ("mocov3.projection_dim", 0, "config.mocov3.projection_dim=0"),
    ]:
        broken = config.copy_and_resolve_references()
        section, name = key.split(".") if "." in key else (None, key)
        (broken[section] if section else broken)[name] = value
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            mocov3.validate(broken, checks)


def test_shipped_configs_are_the_recipe():
    vitb = shipped_config("mocov3_vitb.py")
    config_validation.validate(vitb, num_devices=1, check_data=False)
    assert vitb.model.variant == "B/16" and vitb.num_epochs == 300
    assert vitb.input.global_batch_size == 4096
    assert optim.peak_learning_rate(vitb.optimizer, 4096) == pytest.approx(1.5e-4 * 16)
    assert (vitb.loss.temperature, vitb.ema.momentum, vitb.ema.schedule) == (0.2, 0.99, "cosine")
    assert vitb.optimizer.weight_decay == 0.1 and vitb.optimizer.warmup_epochs == 40
    demo = shipped_config("fashion_mnist_mocov3.py")
    config_validation.validate(demo, num_devices=1, check_data=False)
    assert demo.input.channels == 1 and demo.input.view_augment.blur_prob == (0.0, 0.0)
    # ViT-B: about 2.5x the FLOPs per image of CMAE (cmae_jax.aot counts 112 GFLOPs).
    assert 270e9 < mocov3.flops_per_example(vitb) < 290e9


# ---------------------------------------------------------------------- Through the loop


@pytest.fixture(scope="module")
def uninterrupted_run(small_fashion_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mocov3"))
    config = tiny_config(small_fashion_mnist)
    config.eval.knn = True
    return workdir, mocov3.train_and_evaluate(config, workdir)


def test_run_through_the_loop(uninterrupted_run):
    workdir, results = uninterrupted_run
    assert results["complete"] and [s for s, _ in results["history"]] == list(range(1, 7))
    assert all(np.isfinite(loss) for _, loss in results["history"])
    assert 0.1 < results["knn_top1"] <= 1.0
    state, position = restore_raw(workdir, 6)
    assert position["next_step"] == 6 and set(state["params"]) == {
        "encoder",
        "projector",
        "predictor",
    }
    assert set(state["opt_state"][1]["target"]) == {"encoder", "projector"}


def test_resumed_run_equals_uninterrupted(uninterrupted_run, small_fashion_mnist, tmp_path):
    reference_dir, reference = uninterrupted_run
    config = tiny_config(small_fashion_mnist)
    first = mocov3.train_and_evaluate(config, str(tmp_path), stop_at_step=3)
    second = mocov3.train_and_evaluate(config, str(tmp_path))
    assert first["history"] + second["history"] == reference["history"]
    assert_trees_equal(restore_raw(str(tmp_path), 6)[0], restore_raw(reference_dir, 6)[0])


def test_a_few_steps_lower_the_loss(small_fashion_mnist, tmp_path):
    config = tiny_config(small_fashion_mnist, total_steps=30)
    config.optimizer.base_lr = 2e-3
    config.checkpoint_every_steps = 1000
    history = [loss for _, loss in mocov3.train_and_evaluate(config, str(tmp_path))["history"]]
    assert len(history) == 30 and all(np.isfinite(history))
    assert np.mean(history[-5:]) < np.mean(history[:5])


# ---------------------------------------------------------------------- As a registered method


def test_the_registry_finds_it_and_base_config_takes_its_defaults():
    assert methods.get("mocov3") is mocov3.METHOD
    config = base_config("mocov3")
    assert config.input.views == "two_crops_aug" and config.ema.schedule == "cosine"
    assert config.optimizer.decay_all_params and config.mocov3.frozen_patch_projection
    config_validation.validate(config, num_devices=1, check_data=False)


def test_pipeline_yields_the_declared_columns(small_fashion_mnist):
    config = tiny_config(small_fashion_mnist)
    source = sources.make_source(config.dataset, config.dataset.train_split)
    batch = next(pipeline.train_dataset(config, source, start_step=0).as_numpy_iterator())
    for column, spec in mocov3.STEP.batch_spec(config).items():
        assert batch[column].shape == (32, *spec.shape) and batch[column].dtype == spec.dtype
    # Two different views of the same images.
    assert not np.allclose(batch["view1"], batch["view2"])


def test_random_batch_runs_through_the_built_step():
    config = tiny_config("unused")
    parts = mocov3.STEP.build(config, 10, 30)
    state = nn.meta.unbox(parts.init_state(jax.random.key(0)))
    batch = mocov3.STEP.random_batch(config, 0)
    assert {k: v.shape[1:] for k, v in batch.items()} == {
        k: v.shape for k, v in mocov3.STEP.batch_spec(config).items()
    }
    state, metrics = jax.jit(parts.make_update(None))(state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_command_line_end_to_end(small_fashion_mnist, tmp_path):
    workdir = tmp_path / "run"
    overrides = {
        "total_steps": 3,
        "dataset.idx_dir": small_fashion_mnist,
        "input.global_batch_size": 32,
        "input.image_size": 16,
        "input.patch_size": 4,
        "model.variant": "Mu/4",
        "model.width": 32,
        "model.depth": 1,
        "model.num_heads": 2,
        "mocov3.projector_hidden": 64,
        "mocov3.predictor_hidden": 64,
        "mocov3.projection_dim": 32,
        "eval.batch_size": 64,
    }
    command = [
        sys.executable,
        "-m",
        "cmae_jax.main",
        "--config=configs/fashion_mnist_mocov3.py",
        f"--workdir={workdir}",
    ] + [f"--config.{k}={v}" for k, v in overrides.items()]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.fullmatch(r"k-NN top-1: (\d+\.\d\d)%", out.stdout.strip().splitlines()[-1])
    assert match, out.stdout[-500:]
    with open(workdir / "results.json") as f:
        assert f"{100 * json.load(f)['knn_top1']:.2f}" == match.group(1)
    with open(workdir / "config.json") as f:
        assert json.load(f)["method"] == "mocov3"
    assert (workdir / "checkpoints" / "3").is_dir()
