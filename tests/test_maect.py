"""MAE-CT: the queue, the NN lookup, the loss, frozen parameters, lr multipliers, the EMA
projector, the stage hand-off and a tiny staged run end to end."""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from flax import serialization
from test_sharding import stack_blocks
from test_train import REPO, assert_trees_equal, flat_arrays, restore_raw, tiny_config

from cmae_jax import config_validation, ema, nnclr, param_groups, weights
from cmae_jax import workdir as workdir_files
from cmae_jax.config_defaults import maect_config
from cmae_jax.data import pipeline, sources
from cmae_jax.methods import maect as train_maect
from cmae_jax.models import maect as maect_model
from cmae_jax.models.encoder_spec import EncoderSpec

# ---------------------------------------------------------------------- Queue


def numpy_enqueue(queue, ptr, batch):
    """Reference FIFO: row b of the batch goes to (ptr + b) mod Q."""
    queue = queue.copy()
    for b, row in enumerate(batch):
        queue[(ptr + b) % len(queue)] = row
    return queue, (ptr + len(batch)) % len(queue)


def test_enqueue_is_fifo_with_wrap_around():
    rng = np.random.default_rng(0)
    queue = nnclr.init_queue(10, 4)
    expected, ptr = np.zeros((10, 4), np.float32), 0
    enqueue = jax.jit(nnclr.enqueue)
    for step in range(5):  # 5 batches of 3 into 10 rows: wraps during the 4th
        keys = rng.normal(size=(3, 4)).astype(np.float32)
        queue = enqueue(queue, keys, jnp.full(3, step), jnp.arange(3) + 3 * step)
        expected, ptr = numpy_enqueue(expected, ptr, keys)
        np.testing.assert_array_equal(queue.keys, expected)
        assert int(queue.ptr) == ptr and int(queue.count) == min(3 * (step + 1), 10)
    # The 4th batch (ids 9-11) wrapped to rows 9, 0, 1; the 5th (12-14) went to rows 2-4.
    np.testing.assert_array_equal(queue.ids, [10, 11, 12, 13, 14, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(queue.labels, [3, 3, 4, 4, 4, 1, 2, 2, 2, 3])
    with pytest.raises(ValueError, match="queue_size"):
        nnclr.enqueue(nnclr.init_queue(2, 4), jnp.zeros((3, 4)), jnp.zeros(3), jnp.zeros(3))


EIGHT_DEVICE_QUEUE = """
import os
import jax, jax.numpy as jnp, ml_collections, numpy as np
from cmae_jax import nnclr, sharding
assert jax.device_count() == 8
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
rows, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
enqueue = jax.jit(nnclr.enqueue, in_shardings=(replicated, rows, rows, rows),
                  out_shardings=replicated)
lookup = jax.jit(lambda q, k, i, r: nnclr.nearest_neighbours(q, k, i, r, 1),
                 in_shardings=(replicated, rows, rows, None), out_shardings=rows)
queue = jax.device_put(nnclr.init_queue(40, 4), replicated)
rng = np.random.default_rng(0)
out = {}
for step in range(4):  # 4 global batches of 16 (2 rows per device) into 40 rows
    keys = rng.normal(size=(16, 4)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    ids = np.arange(16, dtype=np.int32) + 16 * step
    args = [jax.device_put(x, rows) for x in (keys, ids, ids)]
    nn_out, nn_rows, found = lookup(queue, args[0], args[2], jax.random.key(step))
    out[f"rows_{step}"], out[f"found_{step}"] = np.asarray(nn_rows), np.asarray(found)
    queue = enqueue(queue, *args)
    out[f"keys_{step}"] = keys
out["queue"], out["ids"] = np.asarray(queue.keys), np.asarray(queue.ids)
np.savez(os.environ["OUT"], **out)
"""


def test_queue_and_lookup_of_a_global_batch_on_eight_devices(tmp_path):
    path = str(tmp_path / "queue.npz")
    env = dict(os.environ, XLA_FLAGS=xla_flags(host_devices=8), OUT=path)
    out = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICE_QUEUE], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = dict(np.load(path))
    expected, ptr = np.zeros((40, 4), np.float32), 0
    for step in range(4):
        keys = got[f"keys_{step}"]
        # The lookup saw the queue before this step's keys: k = 1 is the NumPy argmax over
        # the rows written so far (ids differ from all queries, so nothing is excluded).
        written = min(16 * step, 40)
        assert (got[f"found_{step}"] == (step > 0)).all()
        if step:
            np.testing.assert_array_equal(
                got[f"rows_{step}"], np.argmax(keys @ expected[:written].T, axis=1)
            )
        expected, ptr = numpy_enqueue(expected, ptr, keys)
    # Every device's rows went in, in global batch order, the 4th batch wrapping around.
    np.testing.assert_array_equal(got["queue"], expected)
    expected_ids = [*range(40, 48), *range(48, 64), *range(24, 40)]
    np.testing.assert_array_equal(got["ids"], expected_ids)


# ---------------------------------------------------------------------- NN lookup


def filled_queue(rng, size=12, dim=6, count=10):
    keys = rng.normal(size=(size, dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    keys[count:] = 0.0
    ids = np.where(np.arange(size) < count, np.arange(size) + 100, -1).astype(np.int32)
    queue = nnclr.Queue(
        keys=jnp.asarray(keys),
        labels=jnp.asarray(np.arange(size) % 3, jnp.int32),
        ids=jnp.asarray(ids),
        ptr=jnp.asarray(count % size, jnp.int32),
        count=jnp.asarray(count, jnp.int32),
    )
    return queue, keys, ids


def test_top1_lookup_excludes_own_entry_and_empty_rows():
    rng = np.random.default_rng(1)
    queue, keys, ids = filled_queue(rng)
    queries = keys[[3, 5, 7, 0]] + 0.05 * rng.normal(size=(4, 6)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    # Queries 0 and 1 are the examples of rows 3 and 5 (their own entries), 2 and 3 are not.
    query_ids = np.array([103, 105, 999, 998], np.int32)
    _, rows, found = nnclr.nearest_neighbours(
        queue, jnp.asarray(queries), jnp.asarray(query_ids), jax.random.key(0), k=1
    )
    sims = queries @ keys.T
    sims[:, 10:] = -np.inf  # never written
    sims[ids[None, :] == query_ids[:, None]] = -np.inf  # own entries
    np.testing.assert_array_equal(rows, np.argmax(sims, axis=1))
    assert found.all()
    assert rows[0] != 3 and rows[1] != 5 and rows[2] == 7 and rows[3] == 0


def test_nearest_lookup_k0_is_the_numpy_argmax():
    """topk 0 (the official stage 2): the argmax over written, non-own rows; no random pick."""
    rng = np.random.default_rng(11)
    queue, keys, ids = filled_queue(rng, size=40, count=33)
    queries = rng.normal(size=(6, 6)).astype(np.float32)
    queries[0] = keys[4]  # query 0 is the example of row 4: its own entry, a perfect match
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    query_ids = np.array([ids[4], 1, 2, 3, 4, 5], np.int32)
    sims = queries @ keys.T
    sims[:, 33:] = -np.inf
    sims[0, 4] = -np.inf
    lookup = jax.jit(lambda r: nnclr.nearest_neighbours(queue, queries, query_ids, r, k=0))
    for seed in range(3):
        neighbours, rows, found = lookup(jax.random.key(seed))
        np.testing.assert_array_equal(rows, np.argmax(sims, axis=1))
        np.testing.assert_array_equal(neighbours, keys[np.argmax(sims, axis=1)])
        assert found.all()
    assert int(rows[0]) != 4
    _, rows, _ = nnclr.nearest_neighbours(queue, queries, query_ids, None, k=0)  # no rng needed
    np.testing.assert_array_equal(rows, np.argmax(sims, axis=1))
    _, _, found = nnclr.nearest_neighbours(nnclr.init_queue(8, 6), queries, query_ids, None, 0)
    assert not found.any()
    with pytest.raises(ValueError, match="topk=-1"):
        nnclr.nearest_neighbours(queue, queries, query_ids, None, k=-1)


def test_topk_pick_is_uniform_over_the_numpy_top_k():
    rng = np.random.default_rng(2)
    queue, keys, ids = filled_queue(rng, size=40, count=33)
    queries = rng.normal(size=(2, 6)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    query_ids = np.array([ids[0], 7], np.int32)  # query 0 owns row 0
    sims = queries @ keys[:33].T
    sims[0, 0] = -np.inf
    top5 = np.argsort(-sims, axis=1)[:, :5]
    lookup = jax.jit(lambda r: nnclr.nearest_neighbours(queue, queries, query_ids, r, k=5))
    picks = np.stack([np.asarray(lookup(jax.random.key(s))[1]) for s in range(200)])
    for q in range(2):
        assert set(picks[:, q]) == set(top5[q])  # only the top 5, and each of them
        counts = np.bincount(picks[:, q], minlength=40)[top5[q]]
        assert counts.min() > 20  # 200 draws over 5: about 40 each
    neighbours, rows, _ = lookup(jax.random.key(0))
    np.testing.assert_array_equal(neighbours, keys[np.asarray(rows)])


def test_lookup_with_few_or_no_candidates():
    rng = np.random.default_rng(3)
    queue, keys, _ = filled_queue(rng, count=3)
    queries = jnp.asarray(keys[:2])
    # Three written rows, one of them the first query's own: 2 and 3 candidates (< k).
    picks = set()
    for s in range(40):
        _, rows, found = nnclr.nearest_neighbours(
            queue, queries, jnp.asarray([100, 555]), jax.random.key(s), k=5
        )
        assert found.all() and int(rows[0]) in (1, 2) and int(rows[1]) in (0, 1, 2)
        picks.add(int(rows[0]))
    assert picks == {1, 2}
    empty = nnclr.init_queue(12, 6)
    neighbours, _, found = nnclr.nearest_neighbours(
        empty, queries, jnp.asarray([1, 2]), jax.random.key(0), k=5
    )
    assert not found.any()
    np.testing.assert_array_equal(neighbours, queries)  # the first step: own key


# ---------------------------------------------------------------------- Loss


def numpy_nnclr(nn, pred, temperature):
    nn = nn / np.linalg.norm(nn, axis=1, keepdims=True)
    pred = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    logits = nn @ pred.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(log_probs))


def test_nnclr_loss_matches_numpy():
    rng = np.random.default_rng(4)
    nn0, nn1, p0, p1 = (rng.normal(size=(8, 5)).astype(np.float32) for _ in range(4))
    loss = nnclr.nnclr_loss(jnp.asarray(nn0), jnp.asarray(p1), 0.15)
    np.testing.assert_allclose(loss, numpy_nnclr(nn0, p1, 0.15), rtol=1e-5)
    sym = nnclr.symmetric_nnclr_loss((nn0, nn1), (p0, p1), 0.3)
    expected = 0.5 * (numpy_nnclr(nn0, p1, 0.3) + numpy_nnclr(nn1, p0, 0.3))
    np.testing.assert_allclose(sym, expected, rtol=1e-5)
    # Gradient only through the predictions.
    grad_nn, grad_p = jax.grad(nnclr.nnclr_loss, argnums=(0, 1))(nn0, p1, 0.15)
    assert not np.any(grad_nn) and np.any(grad_p)


# ---------------------------------------------------------------------- Param groups


def abstract_params(depth=4):
    model = maect_model.MAECT(
        EncoderSpec(width=16, depth=depth, num_heads=2, mlp_dim=32, patch_size=4),
        projector_hidden=8,
        predictor_hidden=8,
        projection_dim=4,
    )
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False)
    )
    return model, flat_arrays_keys(shapes["params"])


def flat_arrays_keys(tree):
    return {
        tuple(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_lr_multiplier_of_every_layer():
    _, flat = abstract_params(depth=4)
    for keys in flat:
        got = param_groups.lr_multiplier(keys, depth=4, decay=0.65)
        if keys[0] != "encoder" or keys[1] == "norm":
            expected = 1.0  # final norm and heads: layer depth + 1
        elif keys[1] in ("embedding", "cls"):
            expected = 0.65**5  # stem: layer 0
        else:
            i = int(keys[1].split("_")[1]) + 1  # block i, 1-based
            expected = 0.65 ** (4 + 1 - i)
        assert got == pytest.approx(expected), keys
    # The optimiser transform multiplies each update by exactly that.
    params = {"encoder": {"block_3": {"w": jnp.ones(2)}, "cls": jnp.ones(2)}, "head": jnp.ones(2)}
    tx = param_groups.scale_by_layer_decay(depth=4, decay=0.65)
    updates, _ = tx.update(params, tx.init(params))
    np.testing.assert_allclose(updates["encoder"]["block_3"]["w"], 0.65)
    np.testing.assert_allclose(updates["encoder"]["cls"], 0.65**5, rtol=1e-6)
    np.testing.assert_allclose(updates["head"], 1.0)


def test_frozen_split_of_stage_three_and_stage_two():
    _, flat = abstract_params(depth=4)
    params = {}
    for keys, leaf in flat.items():
        node = params
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    trainable, frozen = param_groups.split(params, freeze_encoder=False, frozen_blocks=2)
    assert set(frozen) == {"encoder"}
    assert set(frozen["encoder"]) == {"embedding", "cls", "block_0", "block_1"}
    assert set(trainable["encoder"]) == {"block_2", "block_3", "norm"}
    assert set(trainable) == {"encoder", "projector", "predictor"}
    assert_trees_equal(param_groups.merge(trainable, frozen), params)
    trainable, frozen = param_groups.split(params, freeze_encoder=True, frozen_blocks=0)
    assert set(trainable) == {"projector", "predictor"} and set(frozen) == {"encoder"}


def test_a_conv_stem_is_frozen_and_decayed_with_the_patch_embedding():
    stem = ("encoder", "stem_conv0", "kernel")
    assert param_groups.lr_multiplier(stem, depth=4, decay=0.65) == pytest.approx(0.65**5)
    assert param_groups.is_frozen(stem, freeze_encoder=False, frozen_blocks=1)
    assert not param_groups.is_frozen(stem, freeze_encoder=False, frozen_blocks=0)
    assert param_groups.is_frozen(stem, freeze_encoder=True, frozen_blocks=0)
    # Only the encoder's own keys: a head layer of that name is not the stem.
    assert param_groups.lr_multiplier(("projector", "stem_conv0"), 4, 0.65) == 1.0


def test_param_groups_of_scanned_blocks():
    stacked = ("encoder", "blocks", "attn", "qkv", "kernel")
    # Row j of a stacked leaf is block j: multiplier 0.65 ** (depth - j); a leaf cut to its
    # last rows (as split leaves the trainable part) keeps the blocks' own multipliers.
    np.testing.assert_allclose(
        param_groups.lr_multiplier(stacked, 4, 0.65), 0.65 ** np.arange(4, 0, -1)
    )
    np.testing.assert_allclose(
        param_groups.lr_multiplier(stacked, 4, 0.65, rows=2), [0.65**2, 0.65]
    )
    tx = param_groups.scale_by_layer_decay(depth=4, decay=0.65)
    updates = {"encoder": {"blocks": {"w": jnp.ones((2, 3))}, "norm": jnp.ones(3)}}
    scaled, _ = tx.update(updates, tx.init(updates))
    np.testing.assert_allclose(scaled["encoder"]["blocks"]["w"], [[0.65**2] * 3, [0.65] * 3])
    np.testing.assert_allclose(scaled["encoder"]["norm"], 1.0)

    # Freezing cuts each stacked leaf by rows, for arrays, boxed leaves and abstract shapes.
    model = maect_model.MAECT(
        EncoderSpec(width=16, depth=4, num_heads=2, mlp_dim=32, patch_size=4, scan_layers=True),
        projector_hidden=8,
        predictor_hidden=8,
        projection_dim=4,
    )
    init = jax.jit(lambda rng: model.init(rng, jnp.zeros((2, 8, 8, 1)), train=False)["params"])
    boxed = init(jax.random.key(0))
    params = nn.meta.unbox(boxed)
    freeze = dict(freeze_encoder=False, frozen_blocks=1)
    trainable, frozen = param_groups.split(params, **freeze)
    assert set(frozen["encoder"]) == {"embedding", "cls", "blocks"}
    assert set(trainable["encoder"]) == {"blocks", "norm"}
    kernel = params["encoder"]["blocks"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(frozen["encoder"]["blocks"]["attn"]["qkv"]["kernel"], kernel[:1])
    np.testing.assert_array_equal(
        trainable["encoder"]["blocks"]["attn"]["qkv"]["kernel"], kernel[1:]
    )
    assert_trees_equal(param_groups.merge(trainable, frozen), params)
    boxed_trainable, _ = param_groups.split(boxed, **freeze)
    box = boxed_trainable["encoder"]["blocks"]["attn"]["qkv"]["kernel"]
    assert box.value.shape == (3, *kernel.shape[1:]) and box.names[0] == "layers"
    shapes = jax.eval_shape(lambda: params)
    shape_trainable, _ = param_groups.split(shapes, **freeze)
    assert shape_trainable["encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == 3
    # All blocks frozen: no stacked rows train; the whole encoder frozen: nothing of it.
    trainable, _ = param_groups.split(params, freeze_encoder=False, frozen_blocks=4)
    assert set(trainable["encoder"]) == {"norm"}
    trainable, _ = param_groups.split(params, freeze_encoder=True, frozen_blocks=0)
    assert "encoder" not in trainable


# ---------------------------------------------------------------------- One update step


def tiny_step_config(idx_dir, *, scan=False):
    """tiny_maect_config with a 4-block encoder (stem and 2 blocks frozen in stage 3),
    optionally scanned, and an encoder EMA fast enough to move in a few steps."""
    config = tiny_maect_config(idx_dir)
    config.model.depth = 4
    config.model.scan_layers = scan
    config.stages.tune.frozen_blocks = 2
    config.stages.tune.encoder_ema_momentum = 0.5
    return config


def stage_parts(config, stage_name):
    """(stage, model, tx, fresh state, jitted update step) of a contrastive stage."""
    stage = config.stages[train_maect.STAGE_SECTIONS[stage_name]]
    stage_config = train_maect.stage_config(config, stage_name)
    model, tx, schedules = train_maect.make_model_and_optimizer(stage_config, stage, 4, 16)
    init = train_maect.make_init_state(model, tx, stage_config, stage)
    state = jax.jit(lambda rng: nn.meta.unbox(init(rng)))(jax.random.key(0))
    step = train_maect.make_train_step(model, stage_config, stage_name, stage, tx, schedules)
    return stage, model, tx, state, jax.jit(step)


def random_batch(seed, batch=32, size=16):
    rng = np.random.default_rng(seed)
    views = rng.normal(size=(2, batch, size, size, 1)).astype(np.float32)
    return {
        "view1": views[0],
        "view2": views[1],
        "label": rng.integers(0, 10, batch).astype(np.int32),
        "index": (np.arange(batch) + 1000 * seed).astype(np.int32),
    }


def random_queue(seed, size=80, dim=16):
    """A full queue of random unit keys whose ids no batch of random_batch uses."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(size, dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    return nnclr.Queue(
        keys=jnp.asarray(keys),
        labels=jnp.asarray(rng.integers(0, 10, size), jnp.int32),
        ids=jnp.arange(size, dtype=jnp.int32) + 500,
        ptr=jnp.zeros([], jnp.int32),
        count=jnp.asarray(size, jnp.int32),
    )


def normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def stage_three(small_fashion_mnist):
    """stage_parts of the unrolled tiny stage 3 (compiled once for the tests below)."""
    return stage_parts(tiny_step_config(small_fashion_mnist), "3_tune")


def test_stage_two_step_takes_the_nearest_neighbour(small_fashion_mnist):
    """The stage-2 update looks up the NumPy argmax (own entry excluded) in both views."""
    stage, model, _, state, step = stage_parts(tiny_step_config(small_fashion_mnist), "2_head")
    assert stage.topk == 0 and stage.ema_momentum == 0
    batch = random_batch(0)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    outs = [
        model.apply(variables, batch[view], train=True, mutable=["batch_stats"])[0]
        for view in ("view1", "view2")
    ]
    keys = [normalize(out["projection"]) for out in outs]  # stage 2: the online projector
    queue = random_queue(1)
    # Row 7 is example 3's own entry, and a perfect match for it.
    queue = queue.replace(
        keys=queue.keys.at[7].set(keys[0][3].astype(np.float32)),
        ids=queue.ids.at[7].set(batch["index"][3]),
    )
    _, metrics = step(state.replace(queue=queue), batch)

    queue_keys, own = np.asarray(queue.keys), np.asarray(queue.ids)[None] == batch["index"][:, None]

    def lookup(key, rank):  # rank 0: the nearest non-own row
        sims = np.where(own, -np.inf, key @ queue_keys.T)
        return np.argsort(-sims, axis=1)[:, rank]

    def expected_loss(rank):
        nn = [queue_keys[lookup(k, rank)] for k in keys]
        preds = [np.asarray(out["prediction"]) for out in outs]
        return 0.5 * (
            numpy_nnclr(nn[0], preds[1], stage.temperature)
            + numpy_nnclr(nn[1], preds[0], stage.temperature)
        )

    rows = lookup(keys[0], 0)
    assert rows[3] != 7
    np.testing.assert_allclose(metrics["loss"], expected_loss(0), rtol=1e-5)
    assert abs(expected_loss(1) - expected_loss(0)) > 1e-3  # another pick shows in the loss
    same_label = np.asarray(queue.labels)[rows] == batch["label"]
    np.testing.assert_allclose(metrics["nn_accuracy"], same_label.mean(), rtol=1e-6)


# Biases whose effect a BatchNorm removes, so that their gradient is float noise, which
# Adam turns into +-lr steps that differ between any two summation orders: the encoder's
# final-norm bias (it shifts every pooled feature by the same vector, which the
# projector's first BatchNorm takes out) and the projector's last BatchNorm's bias (the
# predictor's first BatchNorm takes it out; the keys that see it get no gradient).
BATCHNORM_CANCELLED_BIASES = (
    "['encoder']['norm']['bias']",
    "['projector']['bn_2']['bias']",
)
# The attention's key bias is noise-driven the same way: it adds q . b to all of a query's
# logits, which the softmax takes out. Its slice of the fused qkv bias, [..., q/k/v, heads,
# head_dim], is compared without it.
QKV_BIAS, KEY_INDEX = "['qkv']['bias']", 1


def test_scanned_and_unrolled_stage_three_take_the_same_steps(small_fashion_mnist, stage_three):
    freeze = dict(freeze_encoder=False, frozen_blocks=2)
    stage, _, _, unrolled, unrolled_step = stage_three
    _, _, tx, scanned, scanned_step = stage_parts(
        tiny_step_config(small_fashion_mnist, scan=True), "3_tune"
    )
    # The same weights, the blocks stacked on a leading axis, and the same queue.
    stacked = jax.tree.map(jnp.asarray, stack_blocks(unrolled.params))
    assert_trees_equal(jax.tree.map(jnp.shape, stacked), jax.tree.map(jnp.shape, scanned.params))
    scanned = scanned.replace(
        params=stacked,
        batch_stats=unrolled.batch_stats,
        opt_state=tx.init(param_groups.split(stacked, **freeze)[0]),
    )
    unrolled, scanned = (
        unrolled.replace(queue=random_queue(2)),
        scanned.replace(queue=random_queue(2)),
    )
    for i in range(3):
        batch = random_batch(i)
        unrolled, unrolled_metrics = unrolled_step(unrolled, batch)
        scanned, scanned_metrics = scanned_step(scanned, batch)
        np.testing.assert_allclose(scanned_metrics["loss"], unrolled_metrics["loss"], rtol=1e-5)

    def close(scanned_tree, unrolled_tree):
        expected = flat_arrays(stack_blocks(unrolled_tree))
        got = flat_arrays(scanned_tree)
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            if any(bias in key for bias in BATCHNORM_CANCELLED_BIASES):
                continue
            actual = got[key]
            if key.endswith(QKV_BIAS):
                actual, value = (np.delete(a, KEY_INDEX, axis=-3) for a in (actual, value))
            np.testing.assert_allclose(actual, value, rtol=1e-4, atol=1e-6, err_msg=key)

    close(scanned.params, unrolled.params)
    close(
        {"encoder": train_maect.ema_encoder(scanned, stage)},
        {"encoder": train_maect.ema_encoder(unrolled, stage)},
    )
    # Rows 0-1 of every stacked leaf (the frozen blocks) are bit for bit where they began.
    blocks, start = scanned.params["encoder"]["blocks"], stacked["encoder"]["blocks"]
    for got, began in zip(jax.tree.leaves(blocks), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(got[:2], began[:2])
    assert any(
        not np.array_equal(g[2:], b[2:]) for g, b in zip(*map(jax.tree.leaves, (blocks, start)))
    )


def test_encoder_ema_of_stage_three(small_fashion_mnist, stage_three):
    freeze = dict(freeze_encoder=False, frozen_blocks=2)
    stage, _, _, state, step = stage_three
    m = stage.encoder_ema_momentum
    state = state.replace(queue=random_queue(3))
    for i in range(2):
        before = ema.target_params(state.opt_state)["encoder"]
        state, _ = step(state, random_batch(i))
        after = ema.target_params(state.opt_state)["encoder"]
        trained, frozen = param_groups.split({"encoder": state.params["encoder"]}, **freeze)
        # The EMA covers exactly the trained encoder leaves: m * old + (1 - m) * new.
        expected = jax.tree.map(lambda t, p: m * t + (1 - m) * p, before, trained["encoder"])
        assert_trees_equal(after, expected, rtol=1e-6, atol=1e-7)
    assert set(frozen["encoder"]) == {"embedding", "cls", "block_0", "block_1"}
    # The EMA encoder: the EMA where the encoder trains, the frozen leaves as they are.
    averaged = train_maect.ema_encoder(state, stage)
    for key in ("embedding", "cls", "block_0", "block_1"):
        assert_trees_equal(averaged[key], state.params["encoder"][key])
    for key in ("block_2", "block_3", "norm"):
        assert_trees_equal(averaged[key], after[key])
        assert not np.array_equal(
            jax.tree.leaves(averaged[key])[0], jax.tree.leaves(state.params["encoder"][key])[0]
        )
    # What the stage publishes: the EMA encoder (or nothing, with published_encoder 'raw').
    published = train_maect.published_state(state, stage)
    assert_trees_equal(published["params"]["encoder"], averaged)
    assert_trees_equal(published["params"]["projector"], state.params["projector"])
    raw_stage = stage.copy_and_resolve_references()
    raw_stage.published_encoder = "raw"
    assert train_maect.published_state(state, raw_stage) is None
    # Stage 2 (frozen encoder) keeps no encoder EMA: its EMA encoder is the encoder.
    head_stage, _, _, head_state, _ = stage_parts(tiny_step_config(small_fashion_mnist), "2_head")
    assert not train_maect.keeps_encoder_ema(head_stage)
    assert train_maect.ema_encoder(head_state, head_stage) is head_state.params["encoder"]


# ---------------------------------------------------------------------- Views


def test_two_crop_views():
    import tensorflow as tf

    from cmae_jax.config_defaults import fashion_mnist_config
    from cmae_jax.data import views

    config = maect_config(fashion_mnist_config("mae"), "B")
    inp = train_maect.stage_config(config, "3_tune").input
    image = tf.constant(np.random.default_rng(5).integers(0, 256, (28, 28, 1)), tf.uint8)
    seed = tf.constant([3, 4], tf.int64)
    first, second = views.two_crop_views(image, seed, inp)
    assert first.shape == second.shape == (28, 28, 1)  # the demo size
    assert not np.allclose(first, second)  # independent crops
    again = views.two_crop_views(image, seed, inp)
    np.testing.assert_array_equal(first, again[0])  # a pure function of the seed
    # Each view is the plain RandomResizedCrop + flip view of its own sub-seed.
    np.testing.assert_array_equal(
        first, views.online_view(image, tf.random.experimental.stateless_fold_in(seed, 4), inp)
    )
    with inp.unlocked():
        inp.views = "two_crops_aug"
    augmented = views.two_crop_views(image, seed, inp)
    assert not np.allclose(augmented[0], first)  # blur p 1.0 on the first view
    pixels = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_allclose(
        views.solarize(tf.constant(pixels)), np.where(pixels < 128 / 255, pixels, 1 - pixels)
    )


# ---------------------------------------------------------------------- Staged run


def tiny_maect_config(idx_dir):
    """Three tiny stages: MAE 3 steps, head 4 steps, tuning 4 steps, batch 32, queue 80."""
    config = maect_config(tiny_config(idx_dir, method="mae", total_steps=3), "B")
    config.maect.projector_hidden = 32
    config.maect.predictor_hidden = 32
    config.maect.projection_dim = 16
    config.maect.queue_size = 80  # 32-example batches wrap around in the 3rd step
    config.stages.tune.topk = 5  # stage 2 keeps the official 0 (the nearest neighbour)
    config.stages.tune.frozen_blocks = 1  # depth 2: stem and block_0 frozen
    config.stages.tune.encoder_ema_momentum = 0.5  # an EMA encoder visibly apart from the raw
    for stage in (config.stages.head, config.stages.tune):
        stage.input.global_batch_size = 32
        stage.total_steps = 4
    config.checkpoint_every_steps = 1
    config.eval.knn = True
    config.profile_steps = 1  # the last step of each stage
    return config


@pytest.fixture(scope="module")
def staged_run(small_fashion_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("maect"))
    config = tiny_maect_config(small_fashion_mnist)
    config_validation.validate(config, num_devices=jax.device_count())
    summary = train_maect.train_and_evaluate(config, workdir)
    return config, workdir, summary


def test_staged_run_end_to_end(staged_run, capfd):
    config, workdir, summary = staged_run
    assert list(summary["stages"]) == ["1_mae", "2_head", "3_tune"]
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == summary
    for name in summary["stages"]:
        assert 0.1 < summary["stages"][name]["knn_top1"] <= 1.0
        assert os.path.isdir(os.path.join(workdir, name, "checkpoints"))
        # The shared loop: every stage profiles and counts unreadable files.
        assert os.listdir(os.path.join(workdir, name, "profile", "process_0"))
        rows = workdir_files.read_metrics(os.path.join(workdir, name))
        assert [r["skipped_files"] for r in rows if "loss" in r] == [0.0] * (
            3 if name == "1_mae" else 4
        )
    # Stage 2 leaves the encoder as stage 1 made it, so its k-NN is stage 1's.
    assert summary["stages"]["2_head"]["knn_top1"] == summary["stages"]["1_mae"]["knn_top1"]
    # A rerun finds every stage done: it trains nothing and prints the three results.
    capfd.readouterr()
    assert train_maect.train_and_evaluate(config, workdir) == summary
    out = capfd.readouterr().out
    lines = re.findall(r"^k-NN top-1: (\d+\.\d\d)%$", out, re.M)
    assert lines == [f"{100 * s['knn_top1']:.2f}" for s in summary["stages"].values()]
    tune = summary["stages"]["3_tune"]
    for which in ("raw", "ema"):  # stage 3 also prints each of its two encoders
        assert f"k-NN top-1 of the {which} encoder: {100 * tune[f'knn_top1_{which}']:.2f}%" in out


def test_frozen_parameters_stay_bit_identical(staged_run):
    _, workdir, _ = staged_run
    mae, _ = restore_raw(os.path.join(workdir, "1_mae"), 3)
    head, _ = restore_raw(os.path.join(workdir, "2_head"), 4)
    tune, _ = restore_raw(os.path.join(workdir, "3_tune"), 4)
    # Stage 2: the whole encoder is stage 1's, bit for bit (this is also the hand-off).
    assert_trees_equal(head["params"]["encoder"], mae["params"]["encoder"])
    # Stage 3: stem and block_0 frozen, block_1 and the final norm trained.
    for key in ("embedding", "cls", "block_0"):
        assert_trees_equal(tune["params"]["encoder"][key], mae["params"]["encoder"][key])
    for key in ("block_1", "norm"):
        moved = flat_arrays(tune["params"]["encoder"][key])
        before = flat_arrays(mae["params"]["encoder"][key])
        assert any(not np.array_equal(moved[k], before[k]) for k in moved), key
    # No optimiser state at all for frozen parameters.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tune)]
    opt_paths = [p for p in paths if p.startswith("['opt_state']")]
    assert opt_paths and not any(
        f"'{key}'" in p for p in opt_paths for key in ("embedding", "cls", "block_0")
    )
    assert any("'block_1'" in p for p in opt_paths)
    head_paths = jax.tree_util.tree_leaves_with_path(head["opt_state"])
    assert head_paths and not any("'encoder'" in jax.tree_util.keystr(p) for p, _ in head_paths)


def test_projector_ema(staged_run):
    config, workdir, _ = staged_run
    m = config.stages.tune.ema_momentum
    before, _ = restore_raw(os.path.join(workdir, "3_tune"), 3)
    after, _ = restore_raw(os.path.join(workdir, "3_tune"), 4)
    target = lambda state: flat_arrays(state["opt_state"][1]["target"]["projector"])
    online = flat_arrays(after["params"]["projector"])
    old, new = target(before), target(after)
    assert sorted(new) == sorted(online)
    for key, value in new.items():
        np.testing.assert_allclose(
            value, m * old[key] + (1 - m) * online[key], rtol=1e-6, atol=1e-10
        )
        assert not np.array_equal(value, online[key])
    # Stage 2 (momentum 0, as the official code) keeps no EMA copy at all.
    head, _ = restore_raw(os.path.join(workdir, "2_head"), 4)
    assert "target" not in json.dumps(str(head["opt_state"]))


def test_queue_holds_the_last_global_batches_in_order(staged_run, small_fashion_mnist):
    config, workdir, _ = staged_run
    head, _ = restore_raw(os.path.join(workdir, "2_head"), 4)
    stage_config = train_maect.stage_config(config, "2_head")
    source = sources.make_source(stage_config.dataset, "train")
    stream = pipeline.train_dataset(stage_config, source, start_step=0).as_numpy_iterator()
    expected, ptr = np.full((80, 1), -1), 0
    for _ in range(4):  # 4 steps of 32 into 80 rows: steps 3 and 4 wrap around
        batch = next(stream)
        expected, ptr = numpy_enqueue(expected, ptr, batch["index"][:, None])
    queue = head["queue"]
    np.testing.assert_array_equal(queue["ids"], expected[:, 0])
    assert int(queue["ptr"]) == ptr == (4 * 32) % 80 and int(queue["count"]) == 80
    np.testing.assert_allclose(np.linalg.norm(queue["keys"], axis=1), 1.0, rtol=1e-5)


def abstract_maect_state(config, stage_name="3_tune"):
    """The stage's MaectState as ShapeDtypeStructs on one device (no step, no optimiser)."""
    stage_config = train_maect.stage_config(config, stage_name)
    model = maect_model.build_model(stage_config.model, stage_config.input, stage_config.maect)
    size = stage_config.input.image_size
    shapes = jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((2, size, size, 1)), False))
    )
    queue = jax.eval_shape(
        lambda: nnclr.init_queue(stage_config.maect.queue_size, model.projection_dim)
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    place = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree
    )
    init = place(shapes)
    return train_maect.MaectState(
        step=None,
        params=init["params"],
        batch_stats=init["batch_stats"],
        opt_state=None,
        queue=place(queue),
    )


def test_hand_off_loads_encoder_and_heads_exactly(staged_run):
    config, workdir, _ = staged_run
    abstract = abstract_maect_state(config)
    params, batch_stats = train_maect.load_pretrained(os.path.join(workdir, "2_head"), abstract)
    head, _ = restore_raw(os.path.join(workdir, "2_head"), 4)
    assert sorted(params) == ["encoder", "predictor", "projector"]
    assert_trees_equal(params, head["params"])
    assert_trees_equal(batch_stats, head["batch_stats"])
    # From a MAE checkpoint (a step folder here): the encoder only.
    params, batch_stats = train_maect.load_pretrained(
        os.path.join(workdir, "1_mae", "checkpoints", "3"), abstract
    )
    mae, _ = restore_raw(os.path.join(workdir, "1_mae"), 3)
    assert sorted(params) == ["encoder"] and batch_stats == {}
    assert_trees_equal(params["encoder"], mae["params"]["encoder"])


def test_stage_three_starts_with_stage_twos_queue(staged_run):
    config, workdir, _ = staged_run
    abstract = abstract_maect_state(config)
    head, _ = restore_raw(os.path.join(workdir, "2_head"), 4)
    queue = train_maect.load_queue(os.path.join(workdir, "2_head"), abstract.queue)
    assert_trees_equal(serialization.to_state_dict(queue), head["queue"])
    assert train_maect.load_queue(os.path.join(workdir, "1_mae"), abstract.queue) is None
    # Stage 2 left its pointer at 4 * 32 mod 80 = 48 and a full queue; stage 3's 3 batches
    # of 32 went on from there (from an empty queue the pointer would be 96 mod 80 = 16).
    tune, _ = restore_raw(os.path.join(workdir, "3_tune"), 3)
    assert int(head["queue"]["ptr"]) == 48 and int(head["queue"]["count"]) == 80
    assert int(tune["queue"]["ptr"]) == (48 + 3 * 32) % 80 and int(tune["queue"]["count"]) == 80


def test_stage_three_publishes_its_ema_encoder(staged_run, capfd):
    config, workdir, summary = staged_run
    tune_dir = os.path.join(workdir, "3_tune")
    published = weights.find_checkpoint(tune_dir)
    assert (published.name, published.parent.name) == ("published", "4")
    assert weights.find_checkpoint(workdir) == published  # the MAE-CT workdir itself
    raw_dir = os.path.join(tune_dir, "checkpoints", "4", "state")
    assert weights.find_checkpoint(raw_dir) == published.parent / "state"
    # Stage 2 (frozen encoder, no EMA) publishes nothing: readers take its train state.
    assert weights.find_checkpoint(os.path.join(workdir, "2_head")).name == "state"

    # The EMA encoder, by hand from the raw checkpoint: the EMA (opt_state[2]) of the
    # trained leaves, the frozen stem and block_0 as they are.
    tune, _ = restore_raw(tune_dir, 4)
    target = tune["opt_state"][2]["target"]["encoder"]
    assert sorted(target) == ["block_1", "norm"]
    expected = {**tune["params"]["encoder"], **target}
    abstract = abstract_maect_state(config)
    heads = ("projector", "predictor")
    params, batch_stats = weights.load_params(
        tune_dir, abstract.params, optional=heads, abstract_batch_stats=abstract.batch_stats
    )
    assert_trees_equal(params["encoder"], expected)
    assert_trees_equal({k: params[k] for k in heads}, {k: tune["params"][k] for k in heads})
    assert_trees_equal(batch_stats, tune["batch_stats"])
    raw, _ = weights.load_params(raw_dir, abstract.params)
    assert_trees_equal(raw["encoder"], tune["params"]["encoder"])
    moved = flat_arrays(expected["block_1"])
    assert any(
        not np.array_equal(v, flat_arrays(raw["encoder"]["block_1"])[k]) for k, v in moved.items()
    )

    # Both encoders were evaluated; the published (EMA) one is the stage's k-NN.
    stage = summary["stages"]["3_tune"]
    assert stage["knn_top1"] == stage["knn_top1_ema"] and 0.1 < stage["knn_top1_raw"] <= 1.0
    assert "knn_top1_raw" not in summary["stages"]["2_head"]


def test_stage_resumes_exactly(staged_run, tmp_path):
    config, workdir, _ = staged_run
    config = config.copy_and_resolve_references()
    config.eval.knn = False  # the k-NN is checked elsewhere; here only the state counts
    resumed = str(tmp_path / "3_tune")
    init_from = os.path.join(workdir, "2_head")
    first = train_maect.train_stage(config, "3_tune", resumed, init_from=init_from, stop_at_step=2)
    assert not first["complete"] and [s for s, _ in first["history"]] == [1, 2]
    # The restart finds its own step-2 checkpoint (init_from is not used again).
    second = train_maect.train_stage(config, "3_tune", resumed, init_from="/nonexistent")
    assert second["complete"] and [s for s, _ in second["history"]] == [3, 4]
    # A rerun of the finished stage restores its last checkpoint (beside which it published
    # the EMA encoder), trains nothing and publishes the same again.
    third = train_maect.train_stage(config, "3_tune", resumed, init_from="/nonexistent")
    assert third["complete"] and third["history"] == []
    state, _ = restore_raw(resumed, 4)
    reference, _ = restore_raw(os.path.join(workdir, "3_tune"), 4)
    assert_trees_equal(state, reference)


def test_maect_config_errors(small_fashion_mnist, tmp_path):
    config = tiny_maect_config(small_fashion_mnist)
    config.stages.head.init_from = str(tmp_path)
    with pytest.raises(config_validation.ConfigError, match="stages.head.init_from"):
        config_validation.validate(config, num_devices=1)
    config = tiny_maect_config(small_fashion_mnist)
    config.maect.queue_size = 16
    with pytest.raises(config_validation.ConfigError, match="queue_size=16"):
        config_validation.validate(config, num_devices=1)
    config = tiny_maect_config(small_fashion_mnist)
    config.stages.tune.frozen_blocks = 3
    with pytest.raises(config_validation.ConfigError, match="frozen_blocks=3"):
        config_validation.validate(config, num_devices=1)
    config = tiny_maect_config(small_fashion_mnist)
    config.stages.head.topk = -1
    with pytest.raises(config_validation.ConfigError, match="head.topk=-1"):
        config_validation.validate(config, num_devices=1)
    config = tiny_maect_config(small_fashion_mnist)
    config.stages.tune.published_encoder = "online"
    with pytest.raises(config_validation.ConfigError, match="published_encoder='online'"):
        config_validation.validate(config, num_devices=1)
    config = tiny_maect_config(small_fashion_mnist)
    with config.maect.unlocked():
        config.maect.topk = 20  # the key before topk became per stage
    with pytest.raises(config_validation.ConfigError, match="stages.head.topk"):
        config_validation.validate(config, num_devices=1)


# The official yamls (ml-jku/MAE-CT yamls/stage3_maect{,aug}_contrastive_tuning/*.yaml):
# config, pooling, batch, stage-3 (epochs, temperature, top-k, head lr, projector EMA),
# frozen blocks, patch.
OFFICIAL_STAGE_THREE = (
    ("maect_vitb", "mean", 1024, (20, 0.15, 20, 1e-4, 0.99), 6, 16),
    ("maect_vitl", "cls", 1024, (20, 0.2, 20, 1e-4, 0.99), 12, 16),
    ("maect_vith", "cls", 512, (30, 0.3, 20, 1e-4, 0.995), 16, 16),
    ("maect_vith14", "cls", 512, (30, 0.3, 20, 1e-4, 0.995), 16, 14),
    ("maect_vitb_aug", "mean", 1024, (80, 0.15, 10, 5e-4, 0.99), 6, 16),
    ("maect_vitl_aug", "cls", 1024, (40, 0.15, 10, 5e-4, 0.99), 12, 16),
    ("maect_vith_aug", "cls", 512, (40, 0.35, 20, 5e-4, 0.995), 16, 16),
    ("maect_vith14_aug", "cls", 512, (40, 0.35, 20, 5e-4, 0.995), 16, 14),
)


@pytest.mark.parametrize("name,pooling,batch,tune_values,frozen,patch", OFFICIAL_STAGE_THREE)
def test_shipped_maect_configs_are_the_official_recipe(
    name, pooling, batch, tune_values, frozen, patch
):
    import importlib

    sys.path.insert(0, REPO)
    config = importlib.import_module(f"configs.{name}").get_config()
    config_validation.validate(config, num_devices=8, check_data=False)
    head, tune = config.stages.head, config.stages.tune
    views = "two_crops_aug" if name.endswith("_aug") else "two_crops"
    assert config.maect.pooling == config.eval.feature == pooling
    assert config.input.patch_size == patch and config.maect.queue_size == 65536
    # Stage 2 at every size and in both variants: the nearest neighbour, temperature 0.15,
    # 20 epochs, head lr 1e-4, no projector EMA, the whole encoder frozen.
    assert (head.topk, head.temperature, head.num_epochs) == (0, 0.15, 20)
    assert head.head_optimizer.base_lr == 1e-4 and head.ema_momentum == 0.0
    assert head.freeze_encoder and head.input.views == views
    # Stage 3.
    got = (
        tune.num_epochs,
        tune.temperature,
        tune.topk,
        tune.head_optimizer.base_lr,
        tune.ema_momentum,
    )
    assert got == tune_values
    assert tune.frozen_blocks == frozen and tune.layer_decay == 0.65
    assert tune.optimizer.base_lr == 1e-4 and tune.optimizer.weight_decay == 0.05
    assert tune.head_optimizer.weight_decay == 1e-5
    assert tune.encoder_ema_momentum == 0.9999 and tune.published_encoder == "ema"
    assert tune.input.views == views
    assert head.input.global_batch_size == tune.input.global_batch_size == batch
    for stage in (head, tune):
        assert stage.optimizer.warmup_epochs == 0.2 * stage.num_epochs
