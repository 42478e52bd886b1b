r"""Compile a method's real train step ahead of time for a TPU topology, without TPUs.

    python -m cmae_jax.aot --config=configs/cmae_vitl.py --topology=v5e-64 \
        --config.model.dtype=bfloat16 --config.mesh.data=1 --config.mesh.fsdp=-1

libtpu (the optional extra `pip install -e .[tpu-aot]`) compiles for compile-only TPU
devices from `jax.experimental.topologies`; this runs on any x86-64 Linux machine. For each
topology the command prints what the compiler reports for each step of the config's method
(cmae_jax.methods: CMAE's or MAE's one step, MAE-CT's three stages) exactly as the trainer
jits it (same model, optimiser, EMA target, shardings and donation; the abstract batch is
the step's batch_spec):

- per-chip memory (arguments + outputs - donated + temporaries + program) against the HBM;
- FLOPs per step: the compiler's count (remat recomputation included) and the model's
  analytic count (matmuls and attention, no recomputation);
- the compiler's estimated step time: the sum of its per-instruction cycle estimates
  (`estimated_cycles` in the compiled program) at the chip's clock. Collectives carry no
  estimate and are assumed hidden behind compute, so this is a lower bound on step time;
- from these, projected images/s and MFU (analytic model FLOPs / (time x chips x peak)).

Topologies: Cloud TPU names (v4-32, v5e-64, v5p-128, v6e-256; v4/v5p count TensorCores,
two per chip, v5e/v6e count chips) or raw libtpu names (v5e:8x8, v4:2x2x4, v5p:4x4x4).
Several, comma-separated, compile one after another and end with a Markdown table.

TensorFlow-free: it builds the step from the method registry, never the input pipeline.
"""

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import sys
import time
from typing import Any

import flax.linen as nn
import jax
from absl import app, flags, logging
from jax.experimental import topologies
from ml_collections import config_flags

from cmae_jax import config_validation, loop, methods, sharding, train_state
from cmae_jax.models import encoder_spec

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined when it runs: importing this module (for its chip
    table or FLOP count) defines none, so other commands may name theirs alike."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
    flags.DEFINE_string(
        "topology", None, "TPU topologies, comma-separated (v5e-64, v4:2x2x4, ...)."
    )
    flags.DEFINE_integer(
        "num_train_examples",
        1_281_167,
        "Training set size for the lr/EMA schedules (ImageNet-1k); it does not change the program.",
    )
    flags.DEFINE_string("json_out", None, "Also write the results as a JSON list to this file.")
    flags.mark_flags_as_required(["config", "topology"])


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip numbers of a TPU generation (bf16 peak, HBM, TensorCore clock)."""

    name: str
    hbm_gib: float
    peak_tflops: float
    hbm_gbps: float
    clock_ghz: float
    chip_config: str  # libtpu's chip config: 'megacore' fuses a chip's two TensorCores
    cores_per_chip: int  # TensorCores per chip: how Cloud TPU names count v4 / v5p slices


CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 1228, 1.05, "megacore", 2),
    "v5e": Chip("TPU v5e", 16, 197, 819, 1.5, "default", 1),
    "v5p": Chip("TPU v5p", 95, 459, 2765, 1.75, "megacore", 2),
    "v6e": Chip("TPU v6e", 32, 918, 1640, 1.75, "default", 1),
}

# Slice shapes (in chips) of the Cloud TPU accelerator types: 2-D tori for v5e/v6e,
# 3-D for v4/v5p.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16"}
_SHAPES_2D[256] = "16x16"
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
_SHAPES_3D.update({256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"})


def parse_topology(name: str) -> tuple[Chip, str, int]:
    """'v5e-64' or 'v5e:8x8' -> (chip, libtpu topology name, number of chips)."""
    name = name.strip().lower().replace("v5litepod", "v5e")
    raw = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", name)
    cloud = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
    if raw:
        chip = CHIPS[raw.group(1)]
        return chip, name, math.prod(int(d) for d in raw.group(2).split("x"))
    if cloud:
        chip = CHIPS[cloud.group(1)]
        chips, rest = divmod(int(cloud.group(2)), chip.cores_per_chip)
        shapes = _SHAPES_3D if chip.cores_per_chip == 2 else _SHAPES_2D
        if not rest and chips in shapes:
            return chip, f"{cloud.group(1)}:{shapes[chips]}", chips
    raise ValueError(
        f"Unknown TPU topology {name!r}: use e.g. v4-32, v5e-64, v5p-128, v6e-256 "
        f"(slice sizes {sorted(_SHAPES_2D)} chips for v5e/v6e, {sorted(_SHAPES_3D)} chips x 2 "
        "cores for v4/v5p) or a libtpu name such as v5e:8x8 or v4:2x2x4."
    )


def tpu_devices(chip: Chip, topology: str) -> list[Any]:
    """Compile-only devices of a TPU slice, from libtpu (no TPU needed)."""
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            "libtpu is not installed: `pip install -e .[tpu-aot]` (about 140 MB) adds it."
        )
    # libtpu takes a machine-wide lock meant for processes that drive real TPUs; compiling
    # for compile-only devices touches none, so several compiles may run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology,
        chip_config_name=chip.chip_config,
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    return list(desc.devices)


def model_flops_per_step(config: Any) -> float:
    """Analytic FLOPs of one update step of `config` (a single-step method's config or a
    stage's): its method's flops_per_example x the global batch (matmuls and attention,
    forward + backward, no rematerialisation: the 'model FLOPs' of MFU)."""
    step = methods.step_for(config)
    return config.input.global_batch_size * step.flops_per_example(config)


def estimated_cycles(hlo_text: str) -> int:
    """Sum of the compiler's per-instruction cycle estimates over one run of the program.

    Instructions of the entry computation count once; a while loop's body counts its known
    trip count times (scan over layers, gradient accumulation); called computations once
    per call. Fused computations carry no estimates of their own.
    """
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and line.startswith(" "):
            computations[current].append(line)
    if entry is None:
        raise ValueError("No ENTRY computation in the compiled program's text.")

    memo: dict[str, int] = {}

    def total(name: str) -> int:
        if name not in memo:
            memo[name] = 0  # guards against recursion
            cycles = 0
            for line in computations.get(name, []):
                own = re.search(r'"estimated_cycles":"(\d+)"', line)
                cycles += int(own.group(1)) if own else 0
                body = re.search(r"\bbody=%?([\w.\-]+)", line)
                if body and " while(" in line:
                    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                    cycles += (int(trips.group(1)) if trips else 1) * total(body.group(1))
                called = re.search(r" call\(.*\bto_apply=%?([\w.\-]+)", line)
                if called:
                    cycles += total(called.group(1))
            memo[name] = cycles
        return memo[name]

    return total(entry)


def abstract_batch(step: methods.Step, config: Any, batch_sharding: Any) -> dict[str, Any]:
    """The global batch the step is fed, as abstract arrays: its batch_spec, batch rows."""
    rows = config.input.global_batch_size
    return {
        name: jax.ShapeDtypeStruct((rows, *spec.shape), spec.dtype, sharding=batch_sharding)
        for name, spec in step.batch_spec(config).items()
    }


def compile_for_topology(
    config: Any, topology: str, num_train_examples: int, stage: str = ""
) -> dict[str, Any]:
    """Compiles the trainer's jitted step (of `stage`, for a staged method) for `topology`;
    returns what the compiler reports."""
    chip, libtpu_name, num_chips = parse_topology(topology)
    # The program is for TPUs, whatever this host's backend: 'auto' means bfloat16 there.
    config = config.copy_and_resolve_references()
    config.model.dtype = encoder_spec.resolve_dtype(config.model.dtype, "tpu")
    step, config = methods.get(config.method).steps(config)[stage]
    devices = tpu_devices(chip, libtpu_name)
    start = time.time()
    mesh, rules = sharding.mesh_and_rules(config, devices)
    batch = config.input.global_batch_size
    steps_per_epoch = max(num_train_examples // batch, 1)
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    parts = step.build(config, steps_per_epoch, total_steps)
    shardings, abstract_state = train_state.abstract_sharded_state(
        parts.init_state, jax.random.key(config.seed), mesh, rules
    )
    jitted = loop.jit_step(parts.make_update(shardings), shardings, mesh)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    model_flops = model_flops_per_step(config)
    result = {
        "topology": topology,
        "libtpu_topology": libtpu_name,
        "chip": chip.name,
        "chips": num_chips,
        "devices": len(devices),
        "variant": config.model.variant,
        "method": config.method,
        "stage": stage,
        "global_batch": batch,
        "dtype": config.model.dtype,
        "remat": str(config.model.get("remat", "none")),
        "scan_layers": bool(config.model.get("scan_layers", False)),
        "grad_accumulation_steps": int(config.get("grad_accumulation_steps", 1)),
        "mesh": dict(mesh.shape),
        "params_m": num_params / 1e6,
        "hbm_gib": chip.hbm_gib,
        "model_tflops_per_step": model_flops / 1e12,
    }
    batch_spec = abstract_batch(step, config, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jitted.lower(abstract_state, batch_spec)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program whose buffers cannot fit: report its numbers.
        needed = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or needed is None:
            raise
        result.update(
            fits=False,
            memory_gib=float(needed.group(1)),  # temporaries alone: a lower bound
            memory_parts_gib={"temporaries at least": float(needed.group(1))},
            compile_s=time.time() - start,
        )
        return result
    compile_s = time.time() - start

    memory = compiled.memory_analysis()
    per_chip = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    compiled_flops = float(cost["flops"]) * len(devices)  # the cost is per device
    step_s = estimated_cycles(compiled.as_text()) / (chip.clock_ghz * 1e9)
    peak = chip.peak_tflops * 1e12
    result.update(
        memory_gib=per_chip / 2**30,
        memory_parts_gib={
            "arguments": memory.argument_size_in_bytes / 2**30,
            "outputs_not_donated": (memory.output_size_in_bytes - memory.alias_size_in_bytes)
            / 2**30,
            "temporaries": memory.temp_size_in_bytes / 2**30,
            "program": memory.generated_code_size_in_bytes / 2**30,
        },
        fits=per_chip <= chip.hbm_gib * 2**30,
        compiled_tflops_per_step=compiled_flops / 1e12,
        step_ms=1e3 * step_s,
        images_per_s=batch / step_s,
        mfu=model_flops / (step_s * num_chips * peak),
        compile_s=compile_s,
    )
    return result


def describe(r: dict[str, Any]) -> str:
    """A few readable lines about one compiled topology."""
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in r["memory_parts_gib"].items())
    stage = f" stage {r['stage']}" if r.get("stage") else ""
    lines = [
        f"{r['method'].upper()}{stage} {r['variant']} ({r['params_m']:.1f}M params), global batch "
        f"{r['global_batch']}, {r['dtype']}, remat {r['remat']}, scan {r['scan_layers']}, "
        f"accumulation {r['grad_accumulation_steps']}",
        f"  topology {r['topology']} ({r['libtpu_topology']}): {r['chips']} x {r['chip']}, "
        f"mesh {mesh}; compiled in {r['compile_s']:.0f} s",
    ]
    if "step_ms" not in r:
        lines.append(
            f"  memory per chip: more than {r['memory_gib']:.3g} GiB of {r['hbm_gib']:.0f} GiB "
            "HBM -> DOES NOT FIT (the compiler refused it); try --config.model.remat=full, "
            "more chips or --config.grad_accumulation_steps"
        )
        return "\n".join(lines)
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines += [
        f"  memory per chip: {r['memory_gib']:.3g} GiB of {r['hbm_gib']:.0f} GiB HBM -> "
        f"{verdict} ({parts} GiB)",
        f"  FLOPs per step: {r['compiled_tflops_per_step']:.4g} TFLOP compiled (remat "
        f"included), {r['model_tflops_per_step']:.4g} TFLOP model (analytic)",
        f"  compiler's estimated step time: {r['step_ms']:.4g} ms (communication assumed hidden)",
        f"  projected: {r['images_per_s']:,.0f} images/s, MFU {100 * r['mfu']:.1f}%",
    ]
    return "\n".join(lines)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The README's table: one row per compiled (config, topology)."""
    head = (
        "| model | topology | mesh (data, fsdp, tensor) | remat | memory / chip | fits | "
        "TFLOP / step (model) | est. step | images/s | MFU |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in results:
        stage = f" {r['stage']}" if r.get("stage") else ""
        start = (
            f"| {r['method'].upper()}{stage} {r['variant']} | {r['topology']} | "
            f"{', '.join(str(v) for v in r['mesh'].values())} | {r['remat']} | "
        )
        if "step_ms" not in r:
            rows.append(
                f"{start}> {r['memory_gib']:.3g} / {r['hbm_gib']:.0f} GiB | no | "
                f"{r['model_tflops_per_step']:.4g} | - | - | - |"
            )
            continue
        rows.append(
            f"{start}{r['memory_gib']:.3g} / {r['hbm_gib']:.0f} GiB | "
            f"{'yes' if r['fits'] else 'no'} | {r['model_tflops_per_step']:.4g} | "
            f"{r['step_ms']:.4g} ms | {r['images_per_s']:,.0f} | {100 * r['mfu']:.1f}% |"
        )
    return "\n".join([head, *rows])


def main(argv: list[str]) -> None:
    """Compiles the config's train step for each topology and prints the compiler's numbers."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    if config.method not in methods.names():
        print(f"cmae_jax.aot compiles a method's train step, not method={config.method!r}.")
        sys.exit(2)
    names = [t.strip() for t in FLAGS.topology.split(",") if t.strip()]
    try:
        for topology in names:
            _, _, chips = parse_topology(topology)
            # The same checks as a real run on this many chips (the data is not needed).
            config_validation.validate(config, num_devices=chips, check_data=False)
    except (ValueError, config_validation.ConfigError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
    stages = list(methods.get(config.method).steps(config))
    results = []
    for topology, stage in itertools.product(names, stages):
        try:
            result = compile_for_topology(config, topology, FLAGS.num_train_examples, stage)
        except RuntimeError as e:
            if "libtpu" in str(e) or "TPU support not installed" in str(e):
                print(f"Cannot compile for TPU here: {e}", file=sys.stderr)
                sys.exit(2)
            raise
        logging.info("%s", result)
        print(describe(result), flush=True)
        results.append(result)
    print(markdown_table(results))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
