r"""Representation benchmark: pretrain every method on Fashion-MNIST, then score every encoder.

    python benchmarks/representation.py --workdir=workdirs/representation
    python benchmarks/representation.py --workdir=W --methods=mae,cmae --epochs=2   # shorter
    python benchmarks/representation.py --workdir=W --minutes=20                     # per method
    python benchmarks/representation.py --workdir=W --seeds=0,1,2     # mean of three seeds

For each method (configs/fashion_mnist_<method>.py) it runs the README's pretraining command
with a k-NN of the encoder every `--knn_every_epochs` epochs (the project's periodic k-NN:
the same cosine k = 20, T = 0.07 weighted vote as the final one, on `--knn_subset` evenly
strided examples of each split, 0 = all of them), then the README's evaluation command
(configs/eval/all.py: k-NN, linear probe, 1/2/5-shot and 1%/10% logistic regression,
k-means cluster accuracy and NMI) on the finished encoder, on the raw pixels and on a randomly
initialised encoder. MAE-CT's stages 2 and 3 start from the MAE run (its stage 1), so its
curve continues the MAE curve. The pretraining sees the 60k training images only.

The 'supervised' row is a reference, not a method: the same encoder trained from random
weights with the training images' labels (configs/fashion_mnist_supervised.py, the
fine-tuning protocol), with the same periodic k-NN and the same evaluation; it is what
this encoder reaches at that budget when it is told the classes.

Everything is resumable: a finished pretraining (its results.json says complete) or
evaluation (its eval_results.json exists) is not run again, and an interrupted pretraining
resumes from its last checkpoint when the benchmark is started again with the same flags.
Started with other flags (another budget, --set or --eval_set) on a workdir that holds runs
made with the old ones, it stops before running anything and names the keys that differ:
their numbers would otherwise be reported under the new command.
`--minutes` stops each pretraining after that many minutes with SIGTERM (the run saves and
exits cleanly; the lr schedule is then cut short, so epoch budgets compare methods fairly,
minute budgets compare what a user gets in that time).

With several --seeds every pretraining runs once per seed (seed 0 in W/<method>, seed N in
W/<method>_seedN) and every number of a method's row is the mean of its seeds', with the
lowest and highest beside it: one seed's k-NN moves by about a point on Fashion-MNIST. The
random encoder is drawn with each seed too (W/eval_random, W/eval_random_seedN); the pixels
are evaluated once.

Writes to the workdir: representation.json (every number, the commands, the curves),
curves.png (k-NN against epochs and against wall minutes, one line per method, the pixels'
k-NN as a line), table.md (the Markdown table of the README), orderings.md (the papers'
orderings and the representation issue's targets checked on the rows, seed by seed, held
where every seed clears them: CMAE above MAE on every protocol, MAE-CT above its MAE by 3
k-NN points and in cluster accuracy, every method above the pixels' k-NN, the best k-NN
and linear probe against 89% and 91%) and per_class.md (the k-NN's top-1 of each class, for
every encoder whose evaluation has it: where the pixels win).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 'supervised' is the labelled reference (configs/fashion_mnist_supervised.py: the same
# encoder fine-tuned from random weights with the labels), not a self-supervised method: the
# ceiling that the pretrainings' rows are read against.
METHODS = ("mae", "cmae", "maect", "mocov3", "supervised")
MAECT_STAGES = ("2_head", "3_tune")
# eval_results.json keys of the table, in column order, with their headings.
COLUMNS = (
    ("knn_top1", "k-NN"),
    ("linear_probe_top1", "linear probe"),
    ("low_shot_1_shot_top1", "1-shot"),
    ("low_shot_5_shot_top1", "5-shot"),
    ("cluster_accuracy", "cluster acc."),
    ("nmi", "NMI"),
)
# eval_results.json's k-NN top-1 of each class (a list, class by class).
PER_CLASS = "knn_top1_per_class"


def config_path(method: str) -> str:
    """The Fashion-MNIST config of a method, relative to the repository."""
    return f"configs/fashion_mnist_{method}.py"


def available_methods(requested: list[str]) -> list[str]:
    """The requested methods, refusing unknown names and ordering MAE before MAE-CT."""
    known = [m for m in METHODS if os.path.exists(os.path.join(REPO, config_path(m)))]
    for method in requested:
        if not os.path.exists(os.path.join(REPO, config_path(method))):
            raise SystemExit(
                f"No config {config_path(method)} for method {method!r}; choose from "
                f"{', '.join(known)}."
            )
    if "maect" in requested and "mae" not in requested:
        raise SystemExit("MAE-CT starts from the MAE run: add mae to --methods.")
    return sorted(requested, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))


def read_json(path: str) -> Any:
    """The JSON file at `path`, or None when it does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_command(command: list[str], log_path: str, minutes: float) -> float:
    """Runs `command` in the repository with its output appended to `log_path`; returns the
    seconds it took. With minutes > 0 it gets SIGTERM (save, clean exit) after that long."""
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=minutes * 60 if minutes > 0 else None)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            process.wait()
    if process.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"Command failed ({process.returncode}): {' '.join(command)}\n{tail}")
    return time.time() - start


def main_command(config: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
    """The `python -m cmae_jax.main` command line of a config with `--config.k=v` overrides."""
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    return [
        sys.executable,
        "-m",
        "cmae_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *flags,
    ]


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (the --set and --eval_set flags) as a dict."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(
                f"--set {pair!r} must be KEY=VALUE, e.g. --set=input.global_batch_size=128"
            )
        out[key.removeprefix("config.")] = value
    return out


def load_config(config: str, overrides: dict[str, str]) -> Any:
    """The config of a config file with command-line style overrides applied; `overrides`
    loses the keys this config does not have (e.g. MAE-CT's stages.* for CMAE)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_config", os.path.join(REPO, config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for key in [k for k in overrides if k.split(".")[0] not in cfg]:
        del overrides[key]
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value
    return cfg


def same_value(there: Any, now: Any, workdir: str) -> bool:
    """Whether a saved config value and the one asked for now agree: equal (10 and 10.0
    alike), two strings naming the same existing file or folder (a path given once relative,
    once absolute), or the same folder of the benchmark's `workdir` named where the workdir
    was when the run was made (a workdir moved or copied since)."""
    if there == now:
        return True
    if not (isinstance(there, str) and isinstance(now, str)):
        return False
    if os.path.exists(there) and os.path.exists(now) and os.path.samefile(there, now):
        return True
    inside = os.path.relpath(now, workdir)
    return not inside.startswith("..") and there.endswith(os.sep + inside)


# Keys added to the configs after runs were made, with the value that says how a run saved
# without the key was made: such a run is reused by a command that asks for that value.
VALUE_BEFORE_THE_KEY = {
    # Until 2026-12-06 every view was made per example (cmae_jax.data.pipeline).
    "input.batched_views": False,
    # Until 2026-12-06 23:00 the crop filled the whole pixel-shift master (data.views).
    "input.master_mode": "resize",
    # Until 2026-12-07 22:00 every lr decayed by a cosine after the warmup (cmae_jax.optim).
    "optimizer.schedule": "cosine",
}


def config_as_saved(config: str, overrides: dict[str, Any]) -> Any:
    """The config that `config` with `overrides` writes to its run's config.json: an
    evaluation's takes the encoder and input geometry of the run it reads
    (features.resolve_config), so a run with another encoder than configs/eval/all.py's
    default (a conv stem, another width) is the same evaluation at every start."""
    cfg = load_config(config, dict(overrides))
    if config != EVAL_CONFIG:
        return cfg
    from cmae_jax.evaluation import features

    try:
        return features.resolve_config(cfg)
    except FileNotFoundError:  # the run it reads has no checkpoint (yet): nothing to take
        return cfg


def config_differences(
    config: str, overrides: dict[str, Any], folder: str, workdir: str
) -> list[str]:
    """How the run already in `folder` (its config.json) was made with another config than
    `config` with `overrides` would give: 'key: X there, Y now' per key; [] when the two
    agree or nothing ran there yet. `workdir`: the benchmark's."""
    from flax import traverse_util

    saved = read_json(os.path.join(folder, "config.json"))
    if saved is None:
        return []
    wanted = json.loads(config_as_saved(config, overrides).to_json_best_effort())
    there = {**VALUE_BEFORE_THE_KEY, **traverse_util.flatten_dict(saved, sep=".")}
    now = traverse_util.flatten_dict(wanted, sep=".")
    absent = "(absent)"
    return [
        f"{key}: {there.get(key, absent)!r} there, {now.get(key, absent)!r} now"
        for key in sorted(set(there) | set(now))
        if not same_value(there.get(key, absent), now.get(key, absent), workdir)
    ]


def refuse_other_configs(planned: dict[tuple[str, str], dict[str, Any]], workdir: str) -> None:
    """Stops, before anything runs, when a folder of `planned` ({(config, folder):
    overrides} per run) holds a run made with another config: its numbers are not this
    command's."""
    for (config, folder), overrides in planned.items():
        differences = config_differences(config, overrides, folder, workdir)
        if differences:
            shown = "; ".join(differences[:8])
            more = f" (and {len(differences) - 8} more)" if len(differences) > 8 else ""
            raise SystemExit(
                f"{folder} holds a run made with another config than this command asks for "
                f"({config}): {shown}{more}. Its numbers are not this command's: use a new "
                f"--workdir for other flags, or delete {folder} to run it again."
            )


@functools.lru_cache
def training_examples(dataset_json: str) -> int:
    """The size of a dataset config's training split (given as JSON: the same data for
    every method and seed is read once)."""
    import ml_collections

    from cmae_jax.data import sources

    dataset = ml_collections.ConfigDict(json.loads(dataset_json))
    return sources.make_source(dataset, dataset.train_split).num_examples


def steps_per_epoch(cfg: Any, batch_size: int) -> int:
    """Optimiser steps in one epoch of the config's training split at `batch_size`."""
    from cmae_jax.data import pipeline

    return pipeline.steps_per_epoch(training_examples(cfg.dataset.to_json()), batch_size)


def run_name(method: str, seed: int) -> str:
    """The workdir folder of a method's runs with one seed (seed 0: the method's name, as
    before seeds existed, so older workdirs stay valid)."""
    return method if seed == 0 else f"{method}_seed{seed}"


def pretraining_runs(
    method: str, workdir: str, args: argparse.Namespace, seed: int = 0
) -> list[Run]:
    """The pretraining runs of a method with one seed (MAE-CT: its stages 2 and 3 after the
    MAE run of the same seed)."""
    overrides = parse_overrides(args.set)
    if seed:
        overrides["seed"] = seed
    cfg = load_config(config_path(method), overrides)
    batch_size = cfg.finetune.batch_size if method == "supervised" else cfg.input.global_batch_size
    epoch_steps = steps_per_epoch(cfg, int(batch_size))
    every = max(1, round(args.knn_every_epochs * epoch_steps))
    overrides.update(
        {
            "eval.every_steps": every,
            "eval.knn_subset": args.knn_subset,
            # The final k-NN of the whole splits comes from the evaluation command.
            "eval.knn": False,
        }
    )
    name = run_name(method, seed)
    method_dir = os.path.join(workdir, name)
    if method == "supervised":
        # The fine-tuning protocol trains it, in method_dir/finetune, for finetune.* epochs.
        if args.epochs:
            overrides["finetune.num_epochs"] = args.epochs
        if args.total_steps:
            overrides["finetune.total_steps"] = args.total_steps
        # Its metrics go to method_dir, its checkpoints and results.json to method_dir/finetune.
        command = main_command(config_path(method), method_dir, overrides)
        tuned = os.path.join(method_dir, "finetune")
        run = Run(name, method, method_dir, command, epoch_steps, overrides, tuned, loop_dir=tuned)
        return [run]
    if method != "maect":
        if args.epochs:
            overrides["num_epochs"] = args.epochs
        if args.total_steps:
            overrides["total_steps"] = args.total_steps
        command = main_command(config_path(method), method_dir, overrides)
        return [Run(name, method, method_dir, command, epoch_steps, overrides, method_dir)]
    overrides["stages.head.init_from"] = os.path.join(workdir, run_name("mae", seed))
    for stage, epochs in (("head", args.maect_head_epochs), ("tune", args.maect_tune_epochs)):
        if epochs:
            overrides[f"stages.{stage}.num_epochs"] = epochs
        if args.total_steps:
            overrides[f"stages.{stage}.total_steps"] = args.total_steps
    command = main_command(config_path(method), method_dir, overrides)
    # Stage 1 is the MAE run: its curve and time come first.
    runs = pretraining_runs("mae", workdir, args, seed)
    for stage in MAECT_STAGES:
        section = cfg.stages[stage.split("_")[1]]
        metric = "knn_top1_subset"
        if section.encoder_ema_momentum > 0:
            metric = f"knn_top1_{section.published_encoder}_subset"
        epoch_steps = steps_per_epoch(cfg, int(section.input.global_batch_size))
        folder = os.path.join(method_dir, stage)
        runs.append(Run(name, method, folder, command, epoch_steps, overrides, method_dir, metric))
    return runs


@dataclasses.dataclass
class Run:
    """One pretraining run: its method, the folder of its metrics and its command."""

    # The workdir folder of the method's runs with this seed (run_name), where the command
    # writes its config.json (MAE-CT: above its stage folders).
    name: str
    method: str
    folder: str
    command: list[str]
    steps_per_epoch: int
    overrides: dict[str, Any]
    # What the evaluation's config.init names once the method's runs are done.
    encoder: str
    # The periodic k-NN's metric: that of the encoder the run hands on (MAE-CT stage 3
    # evaluates its raw and EMA encoders and publishes one of them).
    knn_metric: str = "knn_top1_subset"
    # Where the training loop writes its checkpoints and results.json, if not `folder`.
    loop_dir: str = ""

    def complete(self) -> bool:
        results = read_json(os.path.join(self.loop_dir or self.folder, "results.json"))
        return bool(results and results.get("complete"))


def curve(run: Run) -> tuple[list[dict[str, float]], float]:
    """(step, epoch, wall seconds, k-NN) points of a run's periodic k-NN, and the run's wall
    seconds, from its metrics.jsonl; wall seconds are the logged uptimes (added up over
    resumed processes), interpolated to the k-NN's steps."""
    from cmae_jax import workdir as workdir_files

    wall_of, knn_of = {}, {}
    offset, last_uptime = 0.0, 0.0
    for row in workdir_files.read_metrics(run.folder):
        if "uptime" in row:
            if row["uptime"] < last_uptime:  # a resumed process starts its uptime afresh
                offset += last_uptime
            last_uptime = row["uptime"]
            wall_of[row["step"]] = offset + row["uptime"]
        if run.knn_metric in row:
            knn_of[row["step"]] = row[run.knn_metric]
    logged = sorted(wall_of)
    points = [
        dict(
            step=step,
            epoch=step / run.steps_per_epoch,
            wall_seconds=float(np.interp(step, logged, [wall_of[s] for s in logged]))
            if logged
            else 0.0,
            knn_top1=knn_top1,
        )
        for step, knn_top1 in sorted(knn_of.items())
    ]
    return points, offset + last_uptime


def joined_curve(runs: list[Run]) -> tuple[list[dict[str, Any]], float]:
    """A method's curve over its runs (each later run's epochs and seconds after the last
    run's) and its total wall seconds."""
    points: list[dict[str, Any]] = []
    epoch0 = wall0 = 0.0
    for run in runs:
        own, seconds = curve(run)
        points += [
            dict(p, epoch=epoch0 + p["epoch"], wall_seconds=wall0 + p["wall_seconds"]) for p in own
        ]
        epoch0 = points[-1]["epoch"] if points else epoch0
        wall0 += seconds
    return points, wall0


EVAL_CONFIG = "configs/eval/all.py"


@dataclasses.dataclass(frozen=True)
class Encoder:
    """One evaluated encoder: its folder name (W/eval_<name>), what config.init names, and
    the evaluation's seed (0 is left out of the command, as before seeds existed)."""

    name: str
    init: str
    seed: int = 0

    def eval_dir(self, workdir: str) -> str:
        """The evaluation's workdir."""
        return os.path.join(workdir, f"eval_{self.name}")


def evaluation_overrides(encoder: Encoder, args: argparse.Namespace) -> dict[str, str]:
    """The evaluation command's overrides for one encoder."""
    return {
        "init": encoder.init,
        **({"seed": str(encoder.seed)} if encoder.seed else {}),
        "protocols": repr(tuple(args.protocols)),
        **parse_overrides(args.eval_set),
    }


def evaluate(encoder: Encoder, workdir: str, args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation command's results for one encoder (run unless already there)."""
    eval_dir = encoder.eval_dir(workdir)
    results_path = os.path.join(eval_dir, "eval_results.json")
    command = main_command(EVAL_CONFIG, eval_dir, evaluation_overrides(encoder, args))
    if read_json(results_path) is None:
        print(f"[{encoder.name}] evaluating: {' '.join(command)}", flush=True)
        run_command(command, f"{eval_dir}.log", minutes=0)
    return dict(read_json(results_path), command=" ".join(command[1:]))


def seed_mean(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of several seeds' results: the mean of every table column they all have,
    its lowest and highest value (`spread`) and the seeds' own results (`per_seed`)."""
    if len(per_seed) == 1:
        return per_seed[0]
    keys = [key for key, _ in COLUMNS if all(key in numbers for numbers in per_seed)]
    values = {key: [numbers[key] for numbers in per_seed] for key in keys}
    mean = dict(
        {key: float(np.mean(v)) for key, v in values.items()},
        spread={key: [min(v), max(v)] for key, v in values.items()},
        per_seed=per_seed,
    )
    if all(numbers.get(PER_CLASS) for numbers in per_seed):
        by_class = zip(*(numbers[PER_CLASS] for numbers in per_seed))
        mean[PER_CLASS] = [None if None in seeds else float(np.mean(seeds)) for seeds in by_class]
    return mean


def markdown_table(results: dict[str, dict[str, Any]], wall: dict[str, float]) -> str:
    """The README's table: one row per encoder, one column per protocol; a row of several
    seeds shows their mean and, in brackets, the lowest and highest seed."""
    lines = [
        "| encoder | " + " | ".join(h for _, h in COLUMNS) + " | pretraining wall time |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for name, numbers in results.items():
        cells = []
        for key, _ in COLUMNS:
            cell = f"{100 * numbers[key]:.2f}%" if key in numbers else "-"
            if key in numbers.get("spread", {}):
                low, high = numbers["spread"][key]
                cell += f" ({100 * low:.2f}-{100 * high:.2f})"
            cells.append(cell)
        seconds = wall.get(name)
        time_cell = f"{int(seconds // 60)} min {int(seconds % 60)} s" if seconds else "none"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {time_cell} |")
    return "\n".join(lines) + "\n"


# The papers' orderings and the representation issue's targets, checked on the measured
# rows (orderings.md): (the row that should be above, the row below it, column, by how many
# points at least; 0 = above at all). Rows of several seeds are compared seed by seed (seed
# N of each: MAE-CT's seed N starts from MAE's seed N); the pixels are one number for all.
SELF_SUPERVISED = tuple(method for method in METHODS if method != "supervised")
ORDERINGS = (
    *(("cmae", "mae", key, 0.0) for key, _ in COLUMNS),  # CMAE adds to MAE
    ("maect", "mae", "knn_top1", 3.0),  # the issue: at least 3 k-NN points over its MAE
    ("maect", "mae", "cluster_accuracy", 0.0),  # ... and in cluster accuracy
    *((method, "raw pixels", "knn_top1", 0.0) for method in SELF_SUPERVISED),
)
# The 2-hour targets for the best self-supervised row (its mean over the seeds).
TARGETS = (("knn_top1", 0.89), ("linear_probe_top1", 0.91))


def clears(points: float, margin: float) -> bool:
    """Whether a difference in points is above at all and by `margin` points at least."""
    return points > 0 and points >= margin


def seed_values(row: dict[str, Any], key: str) -> list[float]:
    """A row's `key` seed by seed (one value for a single-seed row)."""
    return [numbers[key] for numbers in row.get("per_seed", [row])]


def orderings(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ordering of ORDERINGS whose two rows were measured, with the seeds' differences
    in points, their mean, how many seeds clear the margin and whether every seed does; then
    each target of TARGETS against the best self-supervised row's mean."""
    headings = dict(COLUMNS)
    checks = []
    for above, below, key, margin in ORDERINGS:
        if key not in results.get(above, {}) or key not in results.get(below, {}):
            continue
        upper, lower = seed_values(results[above], key), seed_values(results[below], key)
        if len(lower) == 1:  # the pixels: one number against every seed
            lower = lower * len(upper)
        # Rounded far below the 0.01 point of one test image in 10k: a tie stays a tie.
        differences = [round(100 * (a - b), 6) for a, b in zip(upper, lower)]
        mean = round(float(np.mean(differences)), 6)
        checks.append(
            dict(
                claim=f"{above} above {below}" + (f" by {margin:g} points" if margin else ""),
                column=headings[key],
                per_seed=differences,
                mean=mean,
                seeds_clearing=sum(clears(d, margin) for d in differences),
                # In every seed: a mean a hair above the margin is inside the seeds' spread.
                holds=all(clears(d, margin) for d in differences),
            )
        )
    for key, target in TARGETS:
        scored = [m for m in SELF_SUPERVISED if key in results.get(m, {})]
        if scored:
            best = max(scored, key=lambda m: results[m][key])
            checks.append(
                dict(
                    claim=f"the best self-supervised row at least {100 * target:g}%",
                    column=headings[key],
                    best=best,
                    value=100 * results[best][key],
                    holds=results[best][key] >= target,
                )
            )
    return checks


def orderings_table(checks: list[dict[str, Any]]) -> str:
    """orderings.md: one line per check of `orderings`; '' when there is none."""
    if not checks:
        return ""
    lines = [
        "| claim | column | per seed (points) | mean | seeds clearing it | holds in every seed |",
        "|---|---|---|---|---|---|",
    ]
    for check in checks:
        if "per_seed" in check:
            seeds = " / ".join(f"{d:+.2f}" for d in check["per_seed"])
            mean = f"{check['mean']:+.2f}"
            count = f"{check['seeds_clearing']} of {len(check['per_seed'])}"
        else:
            seeds, mean, count = f"{check['best']}: {check['value']:.2f}%", "", ""
        holds = "yes" if check["holds"] else "no"
        cells = (check["claim"], check["column"], seeds, mean, count, holds)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_class_table(results: dict[str, dict[str, Any]], class_names: list[str]) -> str:
    """The k-NN's top-1 of each class, one row per encoder that has them (a mean over seeds
    where the row has several); '' when none has."""
    rows = {name: numbers[PER_CLASS] for name, numbers in results.items() if PER_CLASS in numbers}
    if not rows:
        return ""
    lines = [
        "| encoder | " + " | ".join(class_names) + " |",
        "|---" * (len(class_names) + 1) + "|",
    ]
    for name, accuracies in rows.items():
        cells = ["-" if value is None else f"{100 * value:.1f}%" for value in accuracies]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def class_names(args: argparse.Namespace) -> list[str]:
    """The evaluated dataset's class names (Fashion-MNIST's), else 'class 0', 'class 1', ..."""
    from cmae_jax.data import sources

    dataset = load_config(EVAL_CONFIG, parse_overrides(args.eval_set)).dataset
    if dataset.name == "fashion_mnist":
        return list(sources.FASHION_MNIST_CLASSES)
    return [f"class {i}" for i in range(dataset.num_classes)]


def mean_curve(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Several seeds' curves point by point (the same steps: the same config), their mean
    k-NN and wall time, with the lowest and highest k-NN; as far as the shortest goes."""
    if len(per_seed) == 1:
        return per_seed[0]
    length = min(len(points) for points in per_seed)
    curve_points = []
    for i in range(length):
        at_i = [points[i] for points in per_seed]
        knn = [p["knn_top1"] for p in at_i]
        curve_points.append(
            dict(
                at_i[0],
                wall_seconds=float(np.mean([p["wall_seconds"] for p in at_i])),
                knn_top1=float(np.mean(knn)),
                knn_top1_low=min(knn),
                knn_top1_high=max(knn),
            )
        )
    return curve_points


def plot(curves: dict[str, list[dict]], pixels_knn: float | None, path: str) -> None:
    """k-NN against epochs and against wall minutes, one line per method, pixels dashed;
    a method of several seeds is their mean with the range of the seeds shaded.

    Earlier methods are drawn on top: a method whose curve continues another's run (MAE-CT
    from its MAE) would otherwise hide that run's line under its own first points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12.5, 4), sharey=True)
    for axis, key, scale, label in (
        (axes[0], "epoch", 1.0, "pretraining epochs"),
        (axes[1], "wall_seconds", 1 / 60, "pretraining wall minutes"),
    ):
        for order, (method, points) in enumerate(curves.items()):
            if points:
                xs = [p[key] * scale for p in points]
                ys = [100 * p["knn_top1"] for p in points]
                line = axis.plot(xs, ys, marker="o", label=method, zorder=len(curves) + 2 - order)
                if "knn_top1_low" in points[0]:  # several seeds: their range as a band
                    low = [100 * p["knn_top1_low"] for p in points]
                    high = [100 * p["knn_top1_high"] for p in points]
                    axis.fill_between(xs, low, high, color=line[0].get_color(), alpha=0.2)
        if pixels_knn is not None:
            axis.axhline(100 * pixels_knn, color="gray", linestyle="--", label="raw pixels")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("k-NN top-1 (%)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: covers no line
    figure.suptitle("Fashion-MNIST: weighted k-NN (k = 20) of the frozen encoder")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of the benchmark (sys.argv when `argv` is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--seeds",
        default="0",
        help="config.seed of every pretraining, comma-separated: the table shows their mean",
    )
    # Whole epochs: the configs' num_epochs are integers (the run's flag parser refuses 2.0).
    parser.add_argument(
        "--epochs", type=int, default=0, help="pretraining epochs (0: the config's)"
    )
    parser.add_argument("--maect_head_epochs", type=int, default=0)
    parser.add_argument("--maect_tune_epochs", type=int, default=0)
    parser.add_argument(
        "--total_steps", type=int, default=0, help="> 0: steps per run (smoke tests)"
    )
    parser.add_argument("--minutes", type=float, default=0, help="> 0: SIGTERM each run after this")
    parser.add_argument("--knn_every_epochs", type=float, default=1.0)
    parser.add_argument("--knn_subset", type=int, default=0, help="0: the whole splits")
    parser.add_argument(
        "--protocols", default="knn,linear_probe,low_shot,clustering", help="of configs/eval/all.py"
    )
    parser.add_argument(
        "--set", action="append", default=[], help="KEY=VALUE for every pretraining"
    )
    parser.add_argument(
        "--eval_set", action="append", default=[], help="KEY=VALUE for every evaluation"
    )
    args = parser.parse_args(argv)
    args.protocols = [p for p in args.protocols.split(",") if p]
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    except ValueError:
        parser.error(f"--seeds={args.seeds}: give whole numbers, e.g. --seeds=0,1,2")
    if not args.seeds or min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds={args.seeds}: give distinct seeds >= 0, e.g. --seeds=0,1,2")
    if "seed" in parse_overrides(args.set):
        parser.error("--set seed=N: use --seeds=N (its runs get folders of their own)")
    return args


def main() -> None:
    """Pretrains, evaluates and writes representation.json, curves.png and the tables."""
    args = parse_arguments()
    methods = available_methods([m for m in args.methods.split(",") if m])
    seeds = args.seeds
    os.makedirs(args.workdir, exist_ok=True)

    runs = {
        (method, seed): pretraining_runs(method, args.workdir, args, seed)
        for method in methods
        for seed in seeds
    }
    used = {key for method_runs in runs.values() for key in method_runs[-1].overrides}
    unknown = set(parse_overrides(args.set)) - used
    if unknown:
        raise SystemExit(f"--set keys in no method's config: {', '.join(sorted(unknown))}.")
    # The pixels do not depend on the seed: one evaluation. The random encoder is drawn with
    # each seed (config.seed of the evaluation), as the methods' initial weights are.
    encoders = {
        "raw pixels": [Encoder("pixels", "pixels")],
        "random init": [Encoder(run_name("random", s), "random", s) for s in seeds],
    }
    encoders.update(
        {m: [Encoder(run_name(m, s), runs[m, s][-1].encoder) for s in seeds] for m in methods}
    )
    planned = {
        (config_path(r.method), os.path.join(args.workdir, r.name)): r.overrides
        for method_runs in runs.values()
        for r in method_runs
    }
    for evaluated in encoders.values():
        for encoder in evaluated:
            planned[(EVAL_CONFIG, encoder.eval_dir(args.workdir))] = evaluation_overrides(
                encoder, args
            )
    refuse_other_configs(planned, args.workdir)
    for method_runs in runs.values():
        name = method_runs[-1].name
        if all(run.complete() for run in method_runs):
            print(f"[{name}] pretraining complete already", flush=True)
            continue
        command = method_runs[-1].command
        print(f"[{name}] pretraining: {' '.join(command)}", flush=True)
        run_command(command, os.path.join(args.workdir, f"{name}.log"), args.minutes)
    run_curves = {run_name(m, s): joined_curve(runs[m, s]) for m, s in runs}
    curves, wall = {}, {}
    for method in methods:
        per_seed = [run_curves[run_name(method, seed)] for seed in seeds]
        curves[method] = mean_curve([points for points, _ in per_seed])
        wall[method] = float(np.mean([seconds for _, seconds in per_seed]))

    results = {
        name: seed_mean([evaluate(encoder, args.workdir, args) for encoder in evaluated])
        for name, evaluated in encoders.items()
    }
    pixels_knn = results["raw pixels"].get("knn_top1")
    summary = dict(
        methods=methods,
        seeds=seeds,
        flags=vars(args),
        pretraining_commands={
            run_name(m, s): " ".join(runs[m, s][-1].command[1:]) for m, s in runs
        },
        pretraining_wall_seconds=wall,
        curves=curves,
        # Each seed's own curve (the same as `curves` with one seed).
        run_curves={name: points for name, (points, _) in run_curves.items()},
        results=results,
        orderings=orderings(results),
    )
    with open(os.path.join(args.workdir, "representation.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown_table(results, wall)
    by_orderings = orderings_table(summary["orderings"])
    by_class = per_class_table(results, class_names(args))
    for name, text in (
        ("table.md", table),
        ("orderings.md", by_orderings),
        ("per_class.md", by_class),
    ):
        if text:  # '' where nothing was measured for that table
            with open(os.path.join(args.workdir, name), "w") as f:
                f.write(text)
    plot(curves, pixels_knn, os.path.join(args.workdir, "curves.png"))
    print(table, flush=True)
    print(by_orderings, flush=True)
    print(by_class, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
