"""Speed work kept honest: FLOP counts by hand, the compilation cache, the fused attention,
start-up without matplotlib, and the start-up and input benchmarks run end to end."""

import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mocov3 import tiny_config as tiny_mocov3_config
from test_train import REPO, tiny_vit

from cmae_jax import sharding
from cmae_jax.config_defaults import fashion_mnist_config, fashion_mnist_maect_config
from cmae_jax.models import cmae as cmae_model
from cmae_jax.models import encoder_spec, vit

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import train_step as benchmark  # benchmarks/ is not a package


def matmul_flops(*shapes: tuple[int, int, int]) -> int:
    """2 m k n for each (m, k, n)."""
    return sum(2 * m * k * n for m, k, n in shapes)


def block_matmuls(tokens: int, width: int, mlp: int) -> list[tuple[int, int, int]]:
    """The matmuls of one transformer block on one sequence (per head summed)."""
    t, w = tokens, width
    return [(t, w, 3 * w), (t, t, w), (t, t, w), (t, w, w), (t, w, mlp), (t, mlp, w)]


def tiny_mae_config():
    """16 px grey images, patch 4 (16 patches, 4 visible), encoder 32 x 2, decoder 16 x 1."""
    config = tiny_vit(fashion_mnist_config("mae"))
    config.input.global_batch_size = 2
    config.model.pixel_decoder_width = 16
    config.model.pixel_decoder_depth = 1
    config.model.pixel_decoder_heads = 2
    return config


def test_benchmark_flops_of_a_tiny_mae_equal_a_hand_count():
    config = tiny_mae_config()
    # Encoder on cls + 4 visible patches: embedding of the 4 patches (16 pixels -> 32), two
    # blocks. Decoder: embed 5 tokens 32 -> 16, one block on cls + 16 patches, prediction
    # 16 -> 16 pixels of each of the 17 tokens.
    encoder = matmul_flops((4, 16, 32), *block_matmuls(5, 32, 128) * 2)
    decoder = matmul_flops((5, 32, 16), *block_matmuls(17, 16, 64), (17, 16, 16))
    by_hand = 3 * (encoder + decoder)  # forward + backward, per image
    assert benchmark.flops_per_image(config) == by_hand


def test_benchmark_flops_of_a_conv_stem_equal_a_hand_count():
    config = tiny_mae_config()
    plain = benchmark.flops_per_image(config)
    config.model.stem_channels = 8
    # On each of the 4 visible 4x4 patches (1 channel): 3x3 convs 1 -> 8 and 8 -> 8 on its
    # 16 pixels; the embedding then reads 16 x 8 features instead of 16 pixels.
    stem = matmul_flops((4 * 16, 9, 8), (4 * 16, 72, 8), (4, 16 * 8, 32))
    assert benchmark.flops_per_image(config) == plain + 3 * (stem - matmul_flops((4, 16, 32)))


def test_benchmark_flops_of_mocov3_equal_a_hand_count_with_and_without_a_conv_stem():
    config = tiny_mocov3_config("unused")
    # One view: cls + 16 patches of 4x4 grey pixels, width 32, MLP 128, two blocks; the
    # projector 32 -> 64 -> 64 -> 32, the predictor 32 -> 64 -> 32, a logits row of 32 keys.
    blocks = matmul_flops(*block_matmuls(17, 32, 128) * 2)
    projection = matmul_flops((16, 16, 32))
    projector = matmul_flops((1, 32, 64), (1, 64, 64), (1, 64, 32))
    heads = projector + matmul_flops((1, 32, 64), (1, 64, 32), (1, 32, 32))
    momentum = projection + blocks + projector
    # The recipe: the random patch projection is frozen, so it runs forward only.
    per_view = 3 * (blocks + heads) + projection + momentum
    assert benchmark.flops_per_image(config) == 2 * per_view
    config.mocov3.frozen_patch_projection = False
    per_view = 3 * (projection + blocks + heads) + momentum
    assert benchmark.flops_per_image(config) == 2 * per_view
    # A conv stem of 8 channels below the frozen projection: its two 3x3 convs on each
    # pixel of the 16 patches train (3x); the projection, now 16 x 8 features -> 32, passes
    # their gradient on (2x: no weight gradient).
    config.mocov3.frozen_patch_projection = True
    config.model.stem_channels = 8
    convs = matmul_flops((16 * 16, 9, 8), (16 * 16, 72, 8))
    projection = matmul_flops((16, 16 * 8, 32))
    momentum = convs + projection + blocks + projector
    per_view = 3 * (convs + blocks + heads) + 2 * projection + momentum
    assert benchmark.flops_per_image(config) == 2 * per_view


def test_hf_vitmae_of_the_benchmark_has_our_mae_sizes():
    """--vs=hf times HF's ViTMAEForPreTraining built with the config's encoder and decoder:
    the same trainable parameters as our MAE (HF's fixed sin-cos tables are frozen)."""
    pytest.importorskip("transformers")
    config = tiny_mae_config()
    ours = jax.eval_shape(
        lambda: benchmark.build_step(config, None, *sharding.mesh_and_rules(config))[1].params
    )
    runner, info = benchmark.hf_vitmae_runner(config)
    assert info["params"] == sum(x.size for x in jax.tree.leaves(ours))
    runner.run(1)
    assert math.isfinite(runner.loss)


def test_benchmark_flops_of_a_maect_stage_equal_a_hand_count():
    config = tiny_vit(fashion_mnist_maect_config())
    config.maect.update(projector_hidden=64, predictor_hidden=48, projection_dim=8)
    config.maect.queue_size = 100
    config.stages.tune.input.global_batch_size = 4
    config.stages.tune.frozen_blocks = 1
    # Stage 3: block 0 and the patch embedding frozen (forward only), block 1 and the
    # heads trained; per view: 16 patches + cls.
    frozen = matmul_flops((16, 16, 32), *block_matmuls(17, 32, 128))
    trained = matmul_flops(
        *block_matmuls(17, 32, 128),
        (1, 32, 64),  # projector
        (1, 64, 64),
        (1, 64, 8),
        (1, 8, 48),  # predictor
        (1, 48, 8),
        (1, 8, 4),  # the NNCLR logits row against the batch of 4
    )
    ema_projector = matmul_flops((1, 32, 64), (1, 64, 64), (1, 64, 8))
    lookup = matmul_flops((1, 8, 100))  # against the queue of 100
    per_view = 3 * trained + frozen + ema_projector + lookup
    assert benchmark.flops_per_image(config, "3_tune") == 2 * per_view
    # No frozen block: nothing of the encoder is frozen, the patch embedding trains too.
    config.stages.tune.frozen_blocks = 0
    per_view = 3 * (trained + frozen) + ema_projector + lookup
    assert benchmark.flops_per_image(config, "3_tune") == 2 * per_view


def test_compilation_cache_is_hit_by_a_second_run(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        import jax
        import jax.numpy as jnp
        from jax._src import monitoring
        from cmae_jax import compilation_cache

        compilation_cache.enable(sys.argv[1])
        # Store even this tiny program (JAX's threshold is 1 s of compile time).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        events = []
        monitoring.register_event_listener(lambda name, **kw: events.append(name))
        jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((4, 4))).block_until_ready()
        print("hits", events.count("/jax/compilation_cache/cache_hits"))
        """
    )
    cache = tmp_path / "cache"

    def run():
        out = subprocess.run(
            [sys.executable, "-c", script, str(cache)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split("hits")[-1])

    assert run() == 0
    assert any(cache.iterdir())
    assert run() >= 1


def test_attention_equals_the_explicit_softmax_within_float32_tolerance():
    width, heads = 16, 4
    attention = vit.Attention(heads)
    x = jax.random.normal(jax.random.key(0), (2, 7, width))
    variables = attention.init(jax.random.key(1), x)
    params = nn.meta.unbox(variables["params"])
    # The parameter tree is the one checkpoints hold: fused qkv and output projection.
    assert jax.tree.map(np.shape, params) == {
        "qkv": {"kernel": (width, 3, heads, 4), "bias": (3, heads, 4)},
        "proj": {"kernel": (heads, 4, width), "bias": (width,)},
    }
    fused = attention.apply({"params": params}, x)
    # With 'intermediates' mutable the weights are formed explicitly (attention maps).
    explicit, state = attention.apply({"params": params}, x, mutable=["intermediates"])
    (weights,) = state["intermediates"]["attention_weights"]

    # NumPy: softmax(q k^T / sqrt(d)) v per head, then the output projection.
    qkv = np.einsum("bld,dthk->blthk", np.asarray(x), np.asarray(params["qkv"]["kernel"]))
    q, k, v = np.moveaxis(qkv + np.asarray(params["qkv"]["bias"]), 2, 0)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(4)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", w, v)
    reference = np.einsum("blhk,hkd->bld", out, np.asarray(params["proj"]["kernel"]))
    reference += np.asarray(params["proj"]["bias"])
    np.testing.assert_allclose(weights, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(explicit, reference, rtol=1e-5, atol=1e-5)


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert encoder_spec.resolve_dtype("auto", "cpu") == "float32"
    assert encoder_spec.resolve_dtype("auto", "gpu") == "bfloat16"
    assert encoder_spec.resolve_dtype("auto", "tpu") == "bfloat16"
    assert encoder_spec.resolve_dtype("float32", "tpu") == "float32"
    assert fashion_mnist_config("cmae").model.dtype == "auto"
    config = fashion_mnist_config("cmae")
    assert cmae_model.build_model(config.model, config.input).encoder_spec.dtype == (
        jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    )
    with pytest.raises(ValueError, match="config.model.dtype='float16'"):
        encoder_spec.resolve_dtype("float16")


def test_the_training_path_imports_no_matplotlib():
    # Keras (imported by TensorFlow) would import pyplot, whose first import on a machine
    # builds the font cache; the trainers plot nothing with it.
    script = (
        "import sys; import cmae_jax.main, cmae_jax.methods.cmae, cmae_jax.methods.maect; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# The benchmarks behind the README's speed tables, run end to end on tiny inputs: they must
# keep working as the code under them changes (the numbers are theirs to print, not ours).


def run_benchmark(script: str, *flags: str) -> str:
    """The stdout of `python benchmarks/<script> <flags>`, which must succeed."""
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_startup_benchmark_splits_a_cold_and_a_warm_start(small_fashion_mnist):
    stdout = run_benchmark(
        "startup.py",
        "--config=configs/fashion_mnist_mae.py",
        "--runs=cold,warm",
        f"--set=dataset.idx_dir={small_fashion_mnist}",
        "--set=input.global_batch_size=16",
        "--set=model.depth=1",
        "--set=model.width=32",
        "--set=model.num_heads=2",
    )
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| "):
            name, *cells = (cell.strip() for cell in line.strip().strip("|").split("|"))
            rows[name] = cells
    assert rows["seconds"] == ["cold", "warm"]
    cold_hits, warm_hits = (int(cell) for cell in rows["cache hits"])
    # The warm run finds the step and the init that the cold run compiled and stored.
    assert cold_hits == 0 and warm_hits >= 2
    cold, warm = (float(cell) for cell in rows["total to first step"])
    assert cold > 0 and warm > 0
    assert float(rows["compile step"][0]) > 0


def test_input_pipeline_benchmark_measures_every_row():
    stdout = run_benchmark(
        "input_pipeline.py",
        "--num_images=8",
        "--height=80",
        "--width=72",
        "--batch_size=4",
        "--image_size=64",
        "--shift=4",
        "--batches=2",
        "--warmup=1",
        "--pil_batches=1",
    )
    for row in ("fused decode+crop", "full decode then crop", "synthetic images", "PIL + NumPy"):
        line = next(line for line in stdout.splitlines() if row in line)
        rates = [float(x) for x in line.split()[-4:]]
        assert all(rate > 0 for rate in rates), line
    assert "Ratio tf.data / PIL per core:" in stdout


def test_model_part_names_the_module_path_and_the_pass():
    cases = {
        "jit(step)/transpose(jvp(CMAE))/encoder/block_1/mlp/fc1/dot_general": (
            "encoder/block (backward)"
        ),
        "jit(step)/jvp(CMAE)/pixel_decoder/block_0/attn/qkv/dot_general": (
            "pixel_decoder/block (forward)"
        ),
        "jit(step)/CMAE.target_projection/encoder/block_2/mlp/erf": (
            "CMAE.target_projection/encoder (forward)"
        ),
        "jit(step)/transpose(jvp(MAE))/decoder/norm/mul": "decoder/norm (backward)",
        "jit(step)/add": "add (forward)",
    }
    for op_name, part in cases.items():
        assert benchmark.model_part(op_name) == part


def test_profile_breakdown_puts_the_traced_op_time_on_its_named_parts(tmp_path):
    """A jax.profiler trace of a program with a large matmul under one name and a small
    elementwise op under another: each op's time lands on its name, the matmul's far above."""

    def program(x, w):
        with jax.named_scope("large"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("small"):
            z = jnp.exp(x[:8, :8])
        return y, z

    x = jnp.ones((768, 768), jnp.float32) / 768
    compiled = jax.jit(program).lower(x, x).compile()
    jax.block_until_ready(compiled(x, x))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(4):
            jax.block_until_ready(compiled(x, x))
    parts = benchmark.profile_breakdown(str(tmp_path), compiled.as_text(), 4)
    by_name = {p["part"].split("/")[0]: p for p in parts}
    assert {"large", "small"} <= set(by_name), parts
    assert by_name["large"]["ms_per_step"] > 10 * by_name["small"]["ms_per_step"] > 0
    assert math.isclose(sum(p["share"] for p in parts), 1.0)
    with pytest.raises(FileNotFoundError, match="No \\*.trace.json.gz"):
        benchmark.profile_breakdown(str(tmp_path / "empty"), compiled.as_text(), 4)
