r"""Train-step benchmark: the trainers' own jitted update step, images/s, FLOPs and MFU.

    python benchmarks/train_step.py --config=configs/mae_vitb.py --batch=8 --vs=hf
    python benchmarks/train_step.py --config=configs/fashion_mnist_cmae.py --input=pipeline
    python benchmarks/train_step.py --config=configs/cmae_vitb.py --batch=16 --input=synthetic
    python benchmarks/train_step.py --config=configs/maect_vitb.py --stage=3_tune --batch=8
    python benchmarks/train_step.py --config=configs/cmae_vitl.py --batch=128 --dtype=bfloat16

For the config (each step of its method, cmae_jax.methods: CMAE's or MAE's one step, each
MAE-CT stage) on the current backend it builds the step exactly as the trainer does (the
method's own builders: model, AdamW, EMA target, shardings, donation) and prints:

- compile time and memory: the compiled program's (arguments + outputs - donated +
  temporaries) and the peak the devices report (GPU/TPU) or the process's peak RSS (CPU);
- images/s of the step on one batch kept on the devices (--input=random), the median of
  --rounds rounds of --steps steps after --warmup steps;
- the analytic model FLOPs per image (the method's flops_per_example: matmuls and
  attention, forward + backward) and MFU = FLOPs/image x images/s / peak. The peak: on CPU a matmul
  of the compute dtype measured in the same run on the same cores (so MFU is "of what
  XLA's matmul reaches here"); on GPU/TPU the chip's bf16 dense peak (--peak_tflops
  overrides);
- with --input=pipeline (the config's dataset) or --input=synthetic (generated images,
  no file reads or decoding): the input pipeline's own images/s on this process's cores,
  and the step's images/s when the pipeline feeds it, as in training;
- with --profile_dir: a jax.profiler trace of --steps more steps in that folder, and their
  op time per step by model part (flax module path, forward or backward);
- with --vs=hf: HF transformers' ViTMAEForPreTraining (PyTorch, CPU, same encoder and
  decoder sizes, mask ratio, norm-pix loss, AdamW) on the same batch size, its rounds
  alternating with ours so that machine noise hits both, and the ratio ours / theirs.

One process; with --json_out every number is also written as JSON. --input=random runs
where TensorFlow is not installed (the step, the models and the methods do not import it);
--input=pipeline and --input=synthetic run the tf.data input pipeline, which needs it.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# After the repository is on the path:
from cmae_jax import aot, config_validation, loop, methods, sharding, train_state  # noqa: E402
from cmae_jax.models import encoder_spec  # noqa: E402

FLAGS = flags.FLAGS
# Schedules only set lr / EMA values inside the step; any lengths compile the same program.
STEPS_PER_EPOCH, TOTAL_STEPS = 1000, 100_000

# bf16 dense tensor-core peaks (TFLOP/s per GPU, no sparsity) from NVIDIA's data sheets,
# matched against jax's device_kind in this order; fp16 where the GPU has no bf16 (V100, T4).
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("T4", 65.0),
)
# jax's device_kind of each TPU generation -> cmae_jax.aot.CHIPS.
TPU_KINDS = (("v6 lite", "v6e"), ("v6e", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"))
TPU_KINDS += (("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"))


def define_flags() -> None:
    """The command's flags (defined when it runs, so that tests can import the module)."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
    flags.DEFINE_integer("batch", 0, "Global batch size (0: the config's).")
    flags.DEFINE_integer("steps", 5, "Timed steps per round.")
    flags.DEFINE_integer("rounds", 3, "Timed rounds (alternating with HF under --vs=hf).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "auto"], "Compute dtype.")
    flags.DEFINE_enum("vs", "none", ["none", "hf"], "Also time HF ViTMAEForPreTraining.")
    flags.DEFINE_enum(
        "input",
        "random",
        ["random", "pipeline", "synthetic"],
        "random: one batch kept on the devices; pipeline: also the config's tf.data input "
        "pipeline; synthetic: that pipeline on generated images (no reads, no decoding).",
    )
    flags.DEFINE_string("synthetic_size", "375x500", "HxW of the generated images.")
    flags.DEFINE_string(
        "stage", None, "A staged method's stage, e.g. MAE-CT's 3_tune (default: every stage)."
    )
    flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0: automatic).")
    flags.DEFINE_string("json_out", None, "Also write the results as JSON to this file.")
    flags.DEFINE_string(
        "profile_dir",
        None,
        "Also trace --steps steps with jax.profiler into this folder (TensorBoard's profile "
        "plugin and Perfetto read it) and print where their time goes, by model part.",
    )
    flags.mark_flags_as_required(["config"])


# ----------------------------------------------------------------------------- config


def apply_overrides(config: Any, batch: int, dtype: str | None) -> Any:
    """A copy of `config` with the global batch (every MAE-CT stage's too) and dtype set."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if batch:
            config.input.global_batch_size = batch
            for section in config.get("stages", {}).values():
                section.input.global_batch_size = batch
        if dtype:
            config.model.dtype = dtype
    return config


def stage_setup(config: Any, stage: str | None) -> tuple[methods.Step, Any]:
    """(the step, the config it trains with) of `stage` of the config's method (None: the
    method's only step)."""
    steps = methods.get(config.method).steps(config)
    if (stage or "") not in steps:
        raise app.UsageError(
            f"--stage={stage} is not a step of config.method={config.method!r}; its steps: "
            f"{', '.join(repr(name) for name in steps)}."
        )
    return steps[stage or ""]


def flops_per_image(config: Any, stage: str | None = None) -> float:
    """The analytic model FLOPs of one step per example (the method's flops_per_example)."""
    step, step_config = stage_setup(config, stage)
    return step.flops_per_example(step_config)


# ----------------------------------------------------------------------------- the step


def build_step(config: Any, stage: str | None, mesh: Any, rules: Any) -> tuple[Any, Any]:
    """(jitted step, initial sharded state), built with the trainer's own functions."""
    step, step_config = stage_setup(config, stage)
    parts = step.build(step_config, STEPS_PER_EPOCH, TOTAL_STEPS)
    rng = jax.random.key(step_config.seed)
    state, shardings, _ = train_state.create_sharded_state(parts.init_state, rng, mesh, rules)
    # As the training loop jits it (guard included).
    return loop.jit_step(parts.make_update(shardings), shardings, mesh), state


def random_batch(config: Any, stage: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the arrays the input pipeline feeds the step, filled at random."""
    step, step_config = stage_setup(config, stage)
    return step.random_batch(step_config, seed)


def compiled_memory_bytes(compiled: Any) -> int:
    """Arguments + outputs - donated + temporaries + code of a compiled program."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
        + m.generated_code_size_in_bytes
    )


class Runner:
    """Runs a step function on its state; `run(n)` returns the seconds of n steps."""

    def __init__(
        self,
        step: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
        state: Any,
        batches: Callable[[], Any],
        wait: Callable[[Any], Any] = lambda x: x,
    ) -> None:
        self.step, self.state, self.batches, self.wait = step, state, batches, wait
        self.loss = float("nan")

    def run(self, num_steps: int) -> float:
        """Runs num_steps steps and waits for the last one; returns the seconds taken."""
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        for _ in range(num_steps):
            self.state, metrics = self.step(self.state, self.batches())
        self.wait((self.state, metrics))
        seconds = time.perf_counter() - start
        if metrics:
            self.loss = float(metrics["loss"])
        return seconds


# ----------------------------------------------------------------------------- peak


def cpu_name() -> str:
    """The host CPU's model name (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def measured_matmul_flops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` under jit on this backend: the best of
    `repeats` runs (fastest = least disturbed by other load)."""
    x = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_peak_flops(device: Any, compute_dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if FLAGS.peak_tflops:
        return FLAGS.peak_tflops * 1e12, "--peak_tflops"
    kind = str(device.device_kind)
    if device.platform == "cpu":
        flops = measured_matmul_flops(compute_dtype)
        return flops, f"{compute_dtype} 2048^3 matmul measured in this run"
    if device.platform == "tpu":
        for name, chip in TPU_KINDS:
            if name in kind.lower():
                return aot.CHIPS[chip].peak_tflops * 1e12, f"{aot.CHIPS[chip].name} bf16 peak"
    if device.platform == "gpu":
        for name, tflops in GPU_PEAK_TFLOPS:
            if name in kind:
                return tflops * 1e12, f"{name} bf16 dense peak"
    raise ValueError(f"No peak FLOP/s known for {kind!r}: give --peak_tflops.")


def peak_memory_bytes(device: Any) -> tuple[int, str]:
    """The devices' reported peak use (GPU/TPU), else this process's peak RSS."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


# ----------------------------------------------------------------------------- HF ViTMAE


def check_hf_comparable(config: Any) -> None:
    """Refuses --vs=hf for a step HF's ViTMAE does not compute (before anything compiles):
    HF's is a masked step without a target view or contrastive loss, masked at random."""
    columns = methods.step_for(config).batch_spec(config)
    masked_only = "ids_mask" in columns and "target" not in columns
    mae = masked_only and config.loss.contrastive_weight == 0
    if not mae or config.input.mask_type != "random":
        raise app.UsageError(
            "--vs=hf compares plain MAE (HF ViTMAE has random masking and no contrastive "
            "branch): use configs/mae_*.py, or a MAE-CT config with --stage=1_mae."
        )


def torch_matmul_flops(bf16: bool, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of PyTorch's own n x n x n CPU matmul (best of `repeats`): what its BLAS
    reaches here, beside XLA's in measured_matmul_flops."""
    # Optional dependency (the test extra): imported only for --vs=hf.
    import torch

    x = torch.ones(n, n, dtype=torch.bfloat16 if bf16 else torch.float32)
    x @ x
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def hf_vitmae_runner(config: Any) -> tuple[Runner, dict[str, Any]]:
    """HF ViTMAEForPreTraining with our encoder/decoder sizes, mask ratio, norm-pix loss and
    AdamW (betas 0.9/0.95, wd 0.05) on a fixed random batch, in PyTorch on the CPU."""
    # Optional dependencies (the test extra): imported only for --vs=hf.
    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    check_hf_comparable(config)
    ours = encoder_spec.EncoderSpec.from_config(config.model, config.input)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_config = ViTMAEConfig(
        image_size=config.input.image_size,
        patch_size=ours.patch_size,
        num_channels=ours.channels,
        hidden_size=ours.width,
        num_hidden_layers=ours.depth,
        num_attention_heads=ours.num_heads,
        intermediate_size=ours.mlp_dim,
        decoder_hidden_size=config.model.pixel_decoder_width,
        decoder_num_hidden_layers=config.model.pixel_decoder_depth,
        decoder_num_attention_heads=config.model.pixel_decoder_heads,
        decoder_intermediate_size=4 * config.model.pixel_decoder_width,
        mask_ratio=config.input.mask_ratio,
        norm_pix_loss=config.loss.norm_pix,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = ViTMAEForPreTraining(hf_config).train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(opt.b1, opt.b2), weight_decay=opt.weight_decay
    )
    b, size = config.input.global_batch_size, config.input.image_size
    pixels = torch.randn(b, ours.channels, size, size)
    bf16 = encoder_spec.resolve_dtype(config.model.dtype, "cpu") == "bfloat16"

    def step(state: None, batch: None) -> tuple[None, dict[str, Any]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return state, {"loss": loss.detach()}

    info = {
        "torch_matmul_tflops": torch_matmul_flops(bf16) / 1e12,
        "transformers_attention": hf_config._attn_implementation,
        "torch_threads": threads,
        # Trainable only: HF keeps its fixed sin-cos position tables as frozen parameters.
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch": torch.__version__,
    }
    return Runner(step, None, lambda: None), info


# ----------------------------------------------------------------------------- input


def input_source(config: Any, kind: str) -> Any:
    """The config's training source, or generated images of --synthetic_size."""
    # TF-free: the data sources import TensorFlow, which only --input=pipeline/synthetic need.
    from cmae_jax.data import sources

    if kind == "pipeline":
        return sources.make_source(config.dataset, config.dataset.train_split)
    height, width = (int(v) for v in FLAGS.synthetic_size.lower().split("x"))
    examples = max(16 * config.input.global_batch_size, 1024)
    return sources.SyntheticSource(examples, height, width, channels=config.input.channels)


def pipeline_batches(config: Any, source: Any) -> Iterator[dict[str, np.ndarray]]:
    """The trainer's numpy batches ('corrupt' removed, as pipeline.SkipCounter does)."""
    # TF-free: the input pipeline imports TensorFlow, which only --input=pipeline/synthetic
    # need.
    from cmae_jax.data import pipeline

    batches = pipeline.train_dataset(config, source, start_step=0).as_numpy_iterator()
    return pipeline.SkipCounter(batches, source)


def time_pipeline(batches: Iterator[Any], num_batches: int) -> float:
    """Seconds for `num_batches` batches of the pipeline alone (after 2 of warm-up)."""
    for _ in range(2):
        next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- one run


# XLA's op_name metadata: jit(step)/ then, for differentiated ops, jvp(Model)/ (forward) or
# transpose(jvp(Model))/ (backward), then the flax module path (block_3 -> block here).
_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"', re.M)


def model_part(op_name: str, depth: int = 2) -> str:
    """'jit(step)/transpose(jvp(CMAE))/encoder/block_1/mlp/fc1/dot_general' ->
    'encoder/block (backward)': the module path to `depth`, and the pass."""
    parts = op_name.split("/")[1:]  # without jit(step)
    backward = any(part.startswith("transpose(") for part in parts)
    parts = [p for p in parts if not p.startswith(("jvp(", "transpose("))]
    path = "/".join(re.sub(r"_\d+$", "", p) for p in parts[:depth]) or "(top level)"
    return f"{path} ({'backward' if backward else 'forward'})"


def profile_breakdown(trace_dir: str, hlo_text: str, num_steps: int) -> list[dict[str, Any]]:
    """Op time per step by model part, from the newest jax.profiler trace under `trace_dir`
    and the compiled program's text (which maps each executed op to its op_name).

    The time is summed over the threads that ran ops, so on a multi-core CPU the parts add
    up to more than the step's wall time; ops the program text does not name (the
    runtime's own events) are left out.
    """
    traces = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not traces:
        raise FileNotFoundError(f"No *.trace.json.gz under {trace_dir}.")
    op_names = dict(_OP_NAME.findall(hlo_text))
    with gzip.open(max(traces, key=os.path.getmtime)) as f:
        events = json.load(f)["traceEvents"]
    micros: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in op_names:
            micros[model_part(op_names[event["name"]])] += event["dur"]
    total = sum(micros.values()) or 1.0
    return [
        {"part": part, "ms_per_step": us / 1e3 / num_steps, "share": us / total}
        for part, us in micros.most_common()
    ]


def benchmark(config: Any, stage: str | None) -> dict[str, Any]:
    """Compiles and times the step of `config` (MAE-CT: of `stage`); returns the figures."""
    _, step_config = stage_setup(config, stage)
    batch_size = step_config.input.global_batch_size
    mesh, rules = sharding.mesh_and_rules(step_config)
    batch_sharding = sharding.batch_sharding(mesh)
    dtype = encoder_spec.resolve_dtype(step_config.model.dtype)
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "config": config_flags.get_config_filename(FLAGS["config"]),
        "stage": stage,
        "method": step_config.method,
        "variant": step_config.model.variant,
        "global_batch": batch_size,
        "dtype": dtype,
        "remat": str(step_config.model.get("remat", "none")),
        "scan_layers": bool(step_config.model.get("scan_layers", False)),
        "backend": jax.default_backend(),
        "device_kind": str(device.device_kind),
        "devices": jax.device_count(),
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu_name(),
        "jax": jax.__version__,
        "mesh": dict(mesh.shape),
    }
    if device.platform == "cpu":  # measured before and after the steps; the best counts
        first_peak = device_peak_flops(device, dtype)
    start = time.perf_counter()
    step, state = build_step(config, stage, mesh, rules)
    jax.block_until_ready(state)
    result["init_s"] = time.perf_counter() - start
    result["params"] = sum(int(x.size) for x in jax.tree.leaves(state.params))

    # The pipeline (when measured) supplies the first batch, so that the step compiles for
    # exactly its arrays; the timed steps reuse that batch on the devices.
    if FLAGS.input == "random":
        local = random_batch(config, stage)
    else:
        source = input_source(step_config, FLAGS.input)
        batches = pipeline_batches(step_config, source)
        local = next(batches)
    device_batch = sharding.global_batch(local, batch_sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        start = time.perf_counter()
        compiled = step.lower(state, device_batch).compile()
        result["compile_s"] = time.perf_counter() - start
        result["program_memory_gib"] = compiled_memory_bytes(compiled) / 2**30
        ours = Runner(compiled, state, lambda: device_batch, jax.block_until_ready)
        ours.run(FLAGS.warmup)

        theirs = None
        if FLAGS.vs == "hf":
            theirs, result["hf"] = hf_vitmae_runner(step_config)
            theirs.run(FLAGS.warmup)
        our_times, their_times = [], []
        for _ in range(FLAGS.rounds):
            our_times.append(ours.run(FLAGS.steps))
            if theirs is not None:
                their_times.append(theirs.run(FLAGS.steps))
        result["loss_last"] = ours.loss
        if FLAGS.profile_dir:
            with jax.profiler.trace(FLAGS.profile_dir):
                ours.run(FLAGS.steps)
            result["profile"] = profile_breakdown(
                FLAGS.profile_dir, compiled.as_text(), FLAGS.steps
            )
            result["profile_dir"] = FLAGS.profile_dir

        if FLAGS.input != "random":
            num_batches = FLAGS.steps * FLAGS.rounds
            alone = max(20, num_batches)  # the pipeline is fast: enough batches to time
            seconds = time_pipeline(batches, alone)
            result["pipeline_images_per_s"] = alone * batch_size / seconds
            fed = sharding.prefetch_to_devices(batches, batch_sharding)
            fed_runner = Runner(compiled, ours.state, lambda: next(fed), jax.block_until_ready)
            fed_runner.run(FLAGS.warmup)
            seconds = fed_runner.run(num_batches)
            result["fed_step_images_per_s"] = num_batches * batch_size / seconds
            result["input"] = f"{FLAGS.input} ({source.name})"

    per_round = [FLAGS.steps * batch_size / t for t in our_times]
    result["images_per_s"] = statistics.median(per_round)
    result["images_per_s_rounds"] = per_round
    result["gflops_per_image"] = flops_per_image(config, stage) / 1e9
    peak, peak_source = device_peak_flops(device, dtype)
    if device.platform == "cpu":
        peak = max(peak, first_peak[0])
        peak_source += " (best of before and after the steps)"
    result["peak_tflops_per_device"] = peak / 1e12
    result["peak_source"] = peak_source
    total_peak = peak * result["devices"]
    result["mfu"] = result["gflops_per_image"] * 1e9 * result["images_per_s"] / total_peak
    memory, memory_source = peak_memory_bytes(device)
    result["peak_memory_gib"], result["peak_memory_source"] = memory / 2**30, memory_source
    if their_times:
        hf_rounds = [FLAGS.steps * batch_size / t for t in their_times]
        result["hf"]["images_per_s"] = statistics.median(hf_rounds)
        result["hf"]["images_per_s_rounds"] = hf_rounds
        result["hf"]["mfu"] = (
            result["gflops_per_image"] * 1e9 * result["hf"]["images_per_s"] / total_peak
        )
        result["ours_over_hf"] = result["images_per_s"] / result["hf"]["images_per_s"]
    return result


def describe(r: dict[str, Any]) -> str:
    """Readable lines about one benchmarked step."""
    stage = f" stage {r['stage']}" if r["stage"] else ""
    lines = [
        f"{r['method'].upper()}{stage} {r['variant']}, global batch {r['global_batch']}, "
        f"{r['dtype']}, remat {r['remat']}, scan {r['scan_layers']}, mesh {r['mesh']}",
        f"  {r['devices']} x {r['device_kind']} ({r['backend']}), host {r['cpu']} with "
        f"{r['cores']} cores, jax {r['jax']}",
        f"  init {r['init_s']:.1f} s, compile {r['compile_s']:.1f} s; memory: program "
        f"{r['program_memory_gib']:.3g} GiB, {r['peak_memory_source']} "
        f"{r['peak_memory_gib']:.3g} GiB",
        f"  model FLOPs: {r['gflops_per_image']:.4g} GFLOP per image; peak "
        f"{r['peak_tflops_per_device']:.4g} TFLOP/s per device ({r['peak_source']})",
        f"  ours: {r['images_per_s']:.4g} images/s (median of "
        f"{', '.join(f'{x:.4g}' for x in r['images_per_s_rounds'])}), "
        f"MFU {100 * r['mfu']:.1f}%",
    ]
    if "hf" in r and "images_per_s" in r["hf"]:
        hf = r["hf"]
        lines += [
            f"  HF ViTMAE (torch {hf['torch']}, {hf['torch_threads']} threads, attention "
            f"{hf['transformers_attention']}): {hf['images_per_s']:.4g} images/s (median of "
            f"{', '.join(f'{x:.4g}' for x in hf['images_per_s_rounds'])}), "
            f"MFU {100 * hf['mfu']:.1f}% (torch's own matmul here: "
            f"{hf['torch_matmul_tflops']:.4g} TFLOP/s)",
            f"  ours / HF: {r['ours_over_hf']:.2f}x",
        ]
    if "profile" in r:
        lines.append(
            f"  where the time goes (op time per step summed over threads; trace in "
            f"{r['profile_dir']}):"
        )
        lines += [
            f"    {p['ms_per_step']:8.2f} ms {100 * p['share']:5.1f}%  {p['part']}"
            for p in r["profile"][:16]
        ]
    if "pipeline_images_per_s" in r:
        lines.append(
            f"  input {r['input']}: pipeline alone {r['pipeline_images_per_s']:.4g} images/s; "
            f"step fed by it {r['fed_step_images_per_s']:.4g} images/s (step alone "
            f"{r['images_per_s']:.4g})"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Benchmarks the step of the config (each MAE-CT stage in turn) and prints the figures."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = apply_overrides(FLAGS.config, FLAGS.batch, FLAGS.dtype)
    if FLAGS.input != "random":
        try:
            # TF-free: only the input pipeline needs TensorFlow; importing cmae_jax.data
            # first also hides the accelerators from it.
            import cmae_jax.data  # noqa: F401
        except ImportError as e:
            raise app.UsageError(
                f"--input={FLAGS.input} runs the tf.data input pipeline, which needs "
                f"TensorFlow ({e}); use --input=random or install tensorflow."
            ) from None
    if config.method not in methods.names():
        raise app.UsageError(
            f"config.method={config.method!r} is not a method with a train step; the methods: "
            f"{', '.join(methods.names())}."
        )
    if FLAGS.stage:
        stage_setup(config, FLAGS.stage)  # refuses an unknown stage
        stages = [FLAGS.stage]
    else:
        stages = [name or None for name in methods.get(config.method).steps(config)]
    if FLAGS.vs == "hf":
        for stage in stages:
            check_hf_comparable(stage_setup(config, stage)[1])
    try:
        config_validation.validate(config, num_devices=jax.device_count(), check_data=False)
    except (ValueError, config_validation.ConfigError) as e:
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)
    results = []
    for stage in stages:
        result = benchmark(config, stage)
        print(describe(result), flush=True)
        results.append(result)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
