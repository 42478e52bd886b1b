"""Optimiser pieces: weight-decay mask, lr schedule values, EMA target transform."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cmae_jax import ema, optim


def _opt_cfg(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            base_lr=1.5e-4,
            min_lr=0.0,
            b1=0.9,
            b2=0.95,
            weight_decay=0.05,
            warmup_epochs=2,
            grad_clip_norm=0.0,
        )
    )
    cfg.update(overrides)
    return cfg


def test_weight_decay_mask_only_kernels():
    params = {
        "encoder": {
            "cls": jnp.zeros((1, 1, 4)),
            "patch_embed": {"kernel": jnp.zeros((2, 2, 1, 4)), "bias": jnp.zeros(4)},
            "block_0": {
                "norm1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
                "attn": {"qkv": {"kernel": jnp.zeros((4, 3, 2, 2)), "bias": jnp.zeros((3, 2, 2))}},
            },
        },
        "pixel_decoder": {"mask_token": jnp.zeros((1, 1, 4))},
        "projector": {"bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
    }
    mask = optim.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == [
        "['encoder']['block_0']['attn']['qkv']['kernel']",
        "['encoder']['patch_embed']['kernel']",
    ]


def test_weight_decay_applies_only_to_kernels():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "cls": jnp.ones((1, 2))}
    tx = optim.adamw(_opt_cfg(weight_decay=0.5), learning_rate=0.1)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients Adam's step is 0, so the update is -lr * wd * param where decayed.
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)))
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)
    np.testing.assert_allclose(updates["cls"], 0.0)


def test_learning_rate_schedule_values():
    # peak = 1.5e-4 * 512/256 = 3e-4; warmup 2 epochs x 10 steps; 100 steps in total.
    schedule = optim.learning_rate_schedule(_opt_cfg(), 512, steps_per_epoch=10, total_steps=100)
    peak = 3e-4
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(peak / 2, rel=1e-6)
    assert float(schedule(20)) == pytest.approx(peak, rel=1e-6)
    # Half-cycle cosine after warmup: at step s, peak * 0.5 * (1 + cos(pi * (s-20)/80)).
    for s in (30, 60, 90):
        expected = peak * 0.5 * (1 + np.cos(np.pi * (s - 20) / 80))
        assert float(schedule(s)) == pytest.approx(expected, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)


def test_constant_learning_rate_schedule_holds_the_peak():
    # The same warmup as the cosine's, then 3e-4 to the last step whatever min_lr says.
    cfg = _opt_cfg(schedule="constant", min_lr=1e-6)
    schedule = optim.learning_rate_schedule(cfg, 512, steps_per_epoch=10, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.5e-4, rel=1e-6)
    for s in (20, 55, 99, 100):
        assert float(schedule(s)) == pytest.approx(3e-4, rel=1e-6)


def test_unknown_learning_rate_schedule_is_refused():
    with pytest.raises(ValueError, match="optimizer.schedule='linear'"):
        optim.learning_rate_schedule(_opt_cfg(schedule="linear"), 256, 10, 100)


def test_momentum_schedules():
    constant = ema.momentum_schedule(0.996, 100, "constant")
    assert float(constant(0)) == pytest.approx(0.996) and float(constant(77)) == pytest.approx(
        0.996
    )
    cosine = ema.momentum_schedule(0.996, 100, "cosine")
    assert float(cosine(0)) == pytest.approx(0.996)
    assert float(cosine(50)) == pytest.approx(1 - 0.004 * 0.5, rel=1e-6)
    assert float(cosine(100)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="config.ema.schedule"):
        ema.momentum_schedule(0.996, 100, "linear")


def test_ema_target_update_math():
    params = {
        "encoder": {"w": jnp.array([1.0, 2.0])},
        "projector": {"w": jnp.array([3.0])},
        "decoder": {"w": jnp.array([5.0])},
    }
    m = 0.9
    tx = optax.chain(optax.sgd(1.0), ema.ema_target(lambda step: m, ("encoder", "projector")))
    state = tx.init(params)
    target = ema.target_params(state)
    assert set(target) == {"encoder", "projector"}  # the decoder is not followed
    np.testing.assert_allclose(target["encoder"]["w"], [1.0, 2.0])  # starts as a copy

    grads = {
        "encoder": {"w": jnp.array([1.0, -1.0])},
        "projector": {"w": jnp.array([0.5])},
        "decoder": {"w": jnp.array([1.0])},
    }
    expected_t = {"encoder": np.array([1.0, 2.0]), "projector": np.array([3.0])}
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        expected_t = {
            k: m * expected_t[k] + (1 - m) * np.asarray(params[k]["w"]) for k in expected_t
        }
    target = ema.target_params(state)
    np.testing.assert_allclose(target["encoder"]["w"], expected_t["encoder"], rtol=1e-6)
    np.testing.assert_allclose(target["projector"]["w"], expected_t["projector"], rtol=1e-6)
    assert int(optax.tree_utils.tree_get(state, "count")) == 3


def test_target_never_receives_gradients():
    # Gradients flow into params only; the target lives in the optimiser state.
    params = {"encoder": {"w": jnp.array([1.0])}, "projector": {"w": jnp.array([1.0])}}
    tx = optax.chain(optax.sgd(0.1), ema.ema_target(lambda s: 1.0, ("encoder", "projector")))
    state = tx.init(params)
    updates, state = tx.update(
        {"encoder": {"w": jnp.array([10.0])}, "projector": {"w": jnp.array([10.0])}}, state, params
    )
    # Momentum 1.0: the target must not move at all although the online params did.
    np.testing.assert_array_equal(ema.target_params(state)["encoder"]["w"], [1.0])
    assert float(optax.apply_updates(params, updates)["encoder"]["w"][0]) == pytest.approx(0.0)
