"""benchmarks/representation.py end to end on a tiny budget: every output and its numbers."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from cmae_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MAE-CT continues the MAE run, so these two cover a reconstruction and a contrastive
# stage at the price of one pretraining (CMAE and MoCo v3 run end to end in their own tests);
# the supervised reference is the one row trained by the fine-tuning protocol.
METHODS = ("mae", "maect", "supervised")
# The evaluation folder of each table row (eval_<name>).
EVAL_FOLDERS = {"raw pixels": "pixels", "random init": "random", **{m: m for m in METHODS}}


# test_train.tiny_config's encoder, decoder and heads on the demo's 28 px views in 7 px
# patches, for the pretrainings and every evaluated encoder alike (random init included):
# the outputs, not the numbers, are under test here, and compile time is what the runs spend.
TINY_MODEL = (
    "model.width=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.pixel_decoder_width=32",
    "model.pixel_decoder_depth=1",
    "model.pixel_decoder_heads=2",
)
TINY_HEADS = (
    "maect.projector_hidden=32",
    "maect.predictor_hidden=32",
    "maect.projection_dim=16",
    "stages.tune.frozen_blocks=1",  # of the 2 blocks
)


def benchmark_module():
    """benchmarks/representation.py as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import representation

    return representation


@pytest.fixture(scope="module")
def benchmark_run(small_fashion_mnist, tmp_path_factory):
    """The benchmark at 2 steps per run on the small IDX folder; (workdir, stdout, command)."""
    workdir = str(tmp_path_factory.mktemp("representation"))
    data = f"dataset.idx_dir={small_fashion_mnist}"
    command = [
        sys.executable,
        "benchmarks/representation.py",
        f"--workdir={workdir}",
        f"--methods={','.join(METHODS)}",
        "--total_steps=2",
        # 512 training images at batch 64: 8 steps per epoch, a k-NN every 2 steps.
        "--knn_every_epochs=0.25",
        f"--set={data}",
        "--set=input.global_batch_size=64",
        "--set=stages.head.input.global_batch_size=64",
        "--set=stages.tune.input.global_batch_size=64",
        "--set=maect.queue_size=128",
        "--set=finetune.batch_size=64",
        *(f"--set={key}" for key in TINY_MODEL + TINY_HEADS),
        f"--eval_set={data}",
        *(f"--eval_set={key}" for key in TINY_MODEL),
        "--eval_set=eval.batch_size=64",
        "--eval_set=linear_probe.num_epochs=1",
        "--eval_set=low_shot.shots=(1,5)",
        "--eval_set=low_shot.fractions=(0.1,)",
        "--eval_set=low_shot.seeds=(0,)",
        "--eval_set=low_shot.num_steps=10",
        "--eval_set=clustering.num_init=1",
        "--eval_set=clustering.num_iters=10",
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return workdir, out.stdout, command


def test_every_output_is_written(benchmark_run):
    workdir, stdout, _ = benchmark_run
    with open(os.path.join(workdir, "representation.json")) as f:
        summary = json.load(f)
    encoders = ["raw pixels", "random init", *METHODS]
    assert list(summary["results"]) == encoders
    for name in encoders:
        numbers = summary["results"][name]
        for key in ("knn_top1", "linear_probe_top1", "low_shot_5_shot_top1", "cluster_accuracy"):
            assert 0.0 <= numbers[key] <= 1.0, (name, key, numbers)
        # The same yardstick for everyone: the k-NN of the table is the evaluation's own.
        with open(os.path.join(workdir, f"eval_{EVAL_FOLDERS[name]}", "eval_results.json")) as f:
            assert json.load(f)["knn_top1"] == numbers["knn_top1"]
    with open(os.path.join(workdir, "table.md")) as f:
        table = f.read()
    assert table in stdout
    assert len(table.strip().splitlines()) == 2 + len(encoders)
    row = next(line for line in table.splitlines() if line.startswith("| maect |"))
    assert f"{100 * summary['results']['maect']['knn_top1']:.2f}%" in row
    with open(os.path.join(workdir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Every encoder's k-NN top-1 of each Fashion-MNIST class, from its own evaluation.
    with open(os.path.join(workdir, "per_class.md")) as f:
        by_class = f.read()
    assert by_class in stdout
    lines = by_class.strip().splitlines()
    assert lines[0] == "| encoder | " + " | ".join(sources.FASHION_MNIST_CLASSES) + " |"
    assert len(lines) == 2 + len(encoders)
    per_class = summary["results"]["raw pixels"]["knn_top1_per_class"]
    cells = lines[2].split(" | ")[1:]
    assert lines[2].startswith("| raw pixels |") and len(cells) == 10
    assert cells[0] == f"{100 * per_class[0]:.1f}%"
    # The papers' orderings and the targets, from the rows' own numbers; the
    # supervised reference is in none of them.
    with open(os.path.join(workdir, "orderings.md")) as f:
        by_orderings = f.read()
    assert by_orderings in stdout
    checks = {(c["claim"], c["column"]): c for c in summary["orderings"]}
    assert list(checks) == [
        ("maect above mae by 3 points", "k-NN"),
        ("maect above mae", "cluster acc."),
        ("mae above raw pixels", "k-NN"),
        ("maect above raw pixels", "k-NN"),
        ("the best self-supervised row at least 89%", "k-NN"),
        ("the best self-supervised row at least 91%", "linear probe"),
    ]
    rows = summary["results"]
    gain = 100 * (rows["maect"]["knn_top1"] - rows["mae"]["knn_top1"])
    assert checks["maect above mae by 3 points", "k-NN"]["per_seed"] == pytest.approx([gain])
    assert checks["maect above mae by 3 points", "k-NN"]["holds"] == (round(gain, 6) >= 3)
    best = max(("mae", "maect"), key=lambda m: rows[m]["linear_probe_top1"])
    target = checks["the best self-supervised row at least 91%", "linear probe"]
    assert target["best"] == best
    assert target["value"] == pytest.approx(100 * rows[best]["linear_probe_top1"])
    assert len(by_orderings.strip().splitlines()) == 2 + len(checks)


def test_curves_follow_the_runs(benchmark_run):
    workdir, _, _ = benchmark_run
    with open(os.path.join(workdir, "representation.json")) as f:
        curves = json.load(f)["curves"]
    # 2 steps per run, a k-NN every 2 steps (a quarter epoch of 8 steps): one point a run.
    assert [p["step"] for p in curves["mae"]] == [2]
    assert curves["mae"][0]["epoch"] == pytest.approx(0.25)
    # MAE-CT continues its MAE run (stage 1): the MAE point, then stage 2 and stage 3.
    assert len(curves["maect"]) == 3
    assert curves["maect"][0] == curves["mae"][0]
    epochs = [p["epoch"] for p in curves["maect"]]
    assert epochs == pytest.approx([0.25, 0.5, 0.75])
    walls = [p["wall_seconds"] for p in curves["maect"]]
    assert walls == sorted(walls) and walls[0] > 0
    # The supervised reference's periodic k-NN runs inside its fine-tuning, at its steps.
    assert [p["step"] for p in curves["supervised"]] == [2]
    assert curves["supervised"][0]["epoch"] == pytest.approx(0.25)
    assert 0.0 <= curves["supervised"][0]["knn_top1"] <= 1.0


def test_a_second_start_reuses_everything(benchmark_run):
    workdir, _, command = benchmark_run
    before = {
        name: os.path.getmtime(os.path.join(workdir, name, "metrics.jsonl"))
        for name in ("mae", "maect/3_tune", "supervised")
    }
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("complete already") == len(METHODS)
    assert "evaluating" not in out.stdout
    for name, mtime in before.items():
        assert os.path.getmtime(os.path.join(workdir, name, "metrics.jsonl")) == mtime


def file_times(folder: str) -> list[tuple[str, float]]:
    """Every file under `folder` with its modification time."""
    paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    return sorted((os.path.relpath(path, folder), os.path.getmtime(path)) for path in paths)


@pytest.mark.parametrize(
    "flag, difference",
    [
        # A pretraining budget: the first run checked is MAE's.
        ("--total_steps=3", "total_steps: 2 there, 3 now"),
        # An evaluation setting: the first evaluation checked is the pixels'.
        ("--eval_set=clustering.num_iters=11", "clustering.num_iters: 10 there, 11 now"),
    ],
)
def test_other_flags_on_a_used_workdir_stop_before_anything_runs(benchmark_run, flag, difference):
    """Runs made with other flags are not reused under this command's name, nor resumed."""
    workdir, _, command = benchmark_run
    files_before = file_times(workdir)
    out = subprocess.run([*command, flag], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode != 0
    assert difference in out.stderr, out.stderr[-2000:]
    assert "use a new --workdir" in out.stderr
    assert "pretraining" not in out.stdout and "evaluating" not in out.stdout
    assert file_times(workdir) == files_before


def test_an_evaluation_compares_with_the_encoder_of_the_run_it_reads(benchmark_run):
    """An evaluation saves the encoder of its run (features.resolve_config), not the eval
    config's default: asked without the model flags it is still the same evaluation."""
    representation = benchmark_module()
    workdir, _, command = benchmark_run
    without_model = [f for f in command if f.startswith("--eval_set=") and "=model." not in f]
    args = representation.parse_arguments([f"--workdir={workdir}", *without_model])
    config = representation.EVAL_CONFIG
    tiny_keys = {key.partition("=")[0] for key in TINY_MODEL}
    for name, init, differing in [
        ("mae", os.path.join(workdir, "mae"), set()),
        # The pixels read no run: the eval config's own model is the one asked for there.
        ("pixels", "pixels", tiny_keys),
    ]:
        encoder = representation.Encoder(name, init)
        overrides = representation.evaluation_overrides(encoder, args)
        found = representation.config_differences(
            config, overrides, encoder.eval_dir(workdir), workdir
        )
        assert {difference.partition(":")[0] for difference in found} == differing, found
    assert "model.width: 32 there, None now" in found


def test_saved_and_asked_values_compare_as_the_runs_read_them(tmp_path):
    """Numbers by value; paths by the folder they name, also in a moved benchmark workdir."""
    same_value = benchmark_module().same_value
    workdir = str(tmp_path / "bench")
    os.makedirs(os.path.join(workdir, "mae"))
    assert same_value(10, 10.0, workdir)
    assert same_value([0.2, 1.0], [0.2, 1.0], workdir)
    assert not same_value(5, 10, workdir)
    assert not same_value("pixels", "random", workdir)
    # The same folder given relative and absolute.
    relative = os.path.relpath(os.path.join(workdir, "mae"))
    assert same_value(relative, os.path.join(workdir, "mae"), workdir)
    # The MAE run a MAE-CT run started from, saved where the workdir was when it ran.
    assert same_value("/old/place/bench/mae", os.path.join(workdir, "mae"), workdir)
    assert not same_value("/old/place/bench/cmae", os.path.join(workdir, "mae"), workdir)
    assert not same_value("/old/place/bench/mae", "/elsewhere/mae", workdir)


def test_a_run_saved_before_a_key_existed_compares_as_it_was_made(tmp_path):
    """A run from before config.input.batched_views made its views per example: it is
    another run than the batched default's, and the same as batched_views=False's. One from
    before config.input.master_mode filled the master with the crop: the default's 'resize'."""
    representation = benchmark_module()
    config = "configs/fashion_mnist_mae.py"
    saved = json.loads(representation.load_config(config, {}).to_json_best_effort())
    del saved["input"]["batched_views"]
    del saved["input"]["master_mode"]
    folder = tmp_path / "mae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(saved))
    differences = representation.config_differences(config, {}, str(folder), str(tmp_path))
    assert differences == ["input.batched_views: False there, True now"]
    same = {"input.batched_views": False}
    assert representation.config_differences(config, same, str(folder), str(tmp_path)) == []
    padded = {**same, "input.master_mode": "pad"}
    assert representation.config_differences(config, padded, str(folder), str(tmp_path)) == [
        "input.master_mode: 'resize' there, 'pad' now"
    ]


def test_epoch_budgets_reach_every_run_through_the_runs_own_flag_parser(small_fashion_mnist):
    """--epochs and the MAE-CT stage epochs become overrides that cmae_jax.main accepts."""
    from absl import flags
    from ml_collections import config_flags

    representation = benchmark_module()
    args = representation.parse_arguments(
        [
            "--workdir=/nonexistent",
            f"--set=dataset.idx_dir={small_fashion_mnist}",
            "--epochs=3",
            "--maect_head_epochs=2",
            "--maect_tune_epochs=4",
        ]
    )
    parsed = {}
    for method in representation.METHODS:
        command = representation.pretraining_runs(method, "/nonexistent", args)[-1].command
        # main's --config flag, reading its --config.key=value overrides from this argv.
        argv = [command[0], *(a for a in command[3:] if a.startswith("--config"))]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file(
            "config", None, flag_values=flag_values, lock_config=True, sys_argv=argv
        )
        cwd = os.getcwd()
        os.chdir(REPO)  # the command names its config relative to the repository
        try:
            flag_values(argv)
        finally:
            os.chdir(cwd)
        parsed[method] = flag_values.config
    assert parsed["mae"].num_epochs == parsed["cmae"].num_epochs == 3
    assert parsed["mocov3"].num_epochs == 3
    assert parsed["supervised"].finetune.num_epochs == 3
    assert parsed["maect"].stages.head.num_epochs == 2
    assert parsed["maect"].stages.tune.num_epochs == 4
    assert parsed["maect"].stages.head.init_from == "/nonexistent/mae"


def test_seeds_run_beside_the_first_and_the_table_shows_their_mean(benchmark_run, tmp_path):
    """--seeds=0,1 on a copy of the workdir: seed 0's runs are reused, seed 1's run in
    folders of their own, and every number of a row is the mean of the seeds' numbers."""
    workdir, _, command = benchmark_run
    copy = str(tmp_path / "moved")
    shutil.copytree(workdir, copy)  # also a moved workdir: MAE-CT's saved init_from is old
    # The same flags for MAE and MAE-CT only (the supervised reference's finetune.* key would
    # be in no method's config).
    skipped = ("--workdir", "--methods", "--set=finetune.")
    flags = [a for a in command[2:] if not a.startswith(skipped)]
    seeded = [command[0], command[1], f"--workdir={copy}", "--methods=mae,maect", *flags]
    out = subprocess.run(
        [*seeded, "--seeds=0,1"], capture_output=True, text=True, cwd=REPO, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[mae] pretraining complete already" in out.stdout
    assert "[maect] pretraining complete already" in out.stdout
    assert "[mae_seed1] pretraining:" in out.stdout
    with open(os.path.join(copy, "maect_seed1", "config.json")) as f:
        saved = json.load(f)
    assert saved["seed"] == 1
    assert saved["stages"]["head"]["init_from"] == os.path.join(copy, "mae_seed1")

    with open(os.path.join(copy, "representation.json")) as f:
        summary = json.load(f)
    assert summary["seeds"] == [0, 1]
    with open(os.path.join(copy, "table.md")) as f:
        table = f.read()
    for method in ("mae", "maect"):
        per_seed = []
        for folder in (method, f"{method}_seed1"):
            with open(os.path.join(copy, f"eval_{folder}", "eval_results.json")) as f:
                per_seed.append(json.load(f)["knn_top1"])
        row = summary["results"][method]
        assert row["knn_top1"] == pytest.approx((per_seed[0] + per_seed[1]) / 2)
        assert row["spread"]["knn_top1"] == [min(per_seed), max(per_seed)]
        low, high = (100 * v for v in sorted(per_seed))
        cell = f"{100 * row['knn_top1']:.2f}% ({low:.2f}-{high:.2f})"
        assert cell in next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        # The curve is the seeds' mean, point by point.
        seed0, seed1 = summary["run_curves"][method], summary["run_curves"][f"{method}_seed1"]
        mean_point = summary["curves"][method][0]
        assert mean_point["knn_top1"] == pytest.approx(
            (seed0[0]["knn_top1"] + seed1[0]["knn_top1"]) / 2
        )
        assert mean_point["step"] == seed0[0]["step"] == seed1[0]["step"]
        # Each class's k-NN top-1 is the mean of the seeds' own, class by class.
        by_seed = [seed["knn_top1_per_class"] for seed in row["per_seed"]]
        expected = [None if None in pair else sum(pair) / 2 for pair in zip(*by_seed)]
        assert row["knn_top1_per_class"] == pytest.approx(expected)
    # The orderings pair the seeds: MAE-CT's seed N against MAE's seed N.
    mae, maect = (summary["results"][m]["per_seed"] for m in ("mae", "maect"))
    gains = [100 * (maect[i]["knn_top1"] - mae[i]["knn_top1"]) for i in range(2)]
    check = next(c for c in summary["orderings"] if c["claim"] == "maect above mae by 3 points")
    assert check["per_seed"] == pytest.approx(gains)
    assert check["mean"] == pytest.approx(sum(gains) / 2)
    assert check["seeds_clearing"] == sum(g >= 3 for g in gains)
    # The pixels do not depend on the seed: one evaluation, one number, no range.
    pixels_row = next(line for line in table.splitlines() if line.startswith("| raw pixels |"))
    assert "(" not in pixels_row
    # The random encoder is drawn with each seed: seed 0's evaluation is reused, seed 1's
    # runs with config.seed=1 (other weights, other numbers), and the row is their mean.
    assert "[random] evaluating:" not in out.stdout
    assert "[random_seed1] evaluating:" in out.stdout
    random_results = []
    for folder, seed in (("random", 0), ("random_seed1", 1)):
        with open(os.path.join(copy, f"eval_{folder}", "config.json")) as f:
            assert json.load(f)["seed"] == seed
        with open(os.path.join(copy, f"eval_{folder}", "eval_results.json")) as f:
            random_results.append(json.load(f))
    assert random_results[0] != random_results[1]
    assert summary["results"]["random init"]["knn_top1"] == pytest.approx(
        (random_results[0]["knn_top1"] + random_results[1]["knn_top1"]) / 2
    )
    # Another seed is another run: other weights, data order and masks, another loss.
    losses = {}
    for folder in ("mae", "mae_seed1"):
        with open(os.path.join(copy, folder, "metrics.jsonl")) as f:
            losses[folder] = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert losses["mae"] and losses["mae"] != losses["mae_seed1"]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--seeds=0,0", "distinct seeds"),
        ("--seeds=1,x", "whole numbers"),
        ("--set=seed=1", "use --seeds=N"),
    ],
)
def test_seed_flags_are_checked(flag, message, capsys):
    with pytest.raises(SystemExit):
        benchmark_module().parse_arguments(["--workdir=/nonexistent", flag])
    assert message in capsys.readouterr().err


def test_orderings_compare_seed_by_seed_against_their_margins():
    """Hand-made rows: differences in points seed by seed, the pixels' one number against
    every seed, a margin met by the mean but not by every seed, targets on the best row."""
    representation = benchmark_module()

    def row(*knn: float, probe: float = 0.8) -> dict:
        per_seed = [{"knn_top1": v, "linear_probe_top1": probe} for v in knn]
        mean = {"knn_top1": sum(knn) / len(knn), "linear_probe_top1": probe}
        return dict(mean, per_seed=per_seed) if len(knn) > 1 else mean

    results = {
        "raw pixels": row(0.85),
        "mae": row(0.80, 0.82),
        "cmae": row(0.81, 0.81, probe=0.92),
        "maect": row(0.835, 0.845),
        "supervised": row(0.95, 0.95, probe=0.95),
    }
    checks = {(c["claim"], c["column"]): c for c in representation.orderings(results)}
    cmae = checks["cmae above mae", "k-NN"]
    assert cmae["per_seed"] == pytest.approx([1.0, -1.0]) and cmae["mean"] == pytest.approx(0)
    assert (cmae["seeds_clearing"], cmae["holds"]) == (1, False)  # level is not above
    maect = checks["maect above mae by 3 points", "k-NN"]
    assert maect["per_seed"] == pytest.approx([3.5, 2.5])
    assert maect["mean"] == pytest.approx(3.0)  # the mean clears 3 points, one seed does not
    assert (maect["seeds_clearing"], maect["holds"]) == (1, False)
    pixels = checks["maect above raw pixels", "k-NN"]
    assert pixels["per_seed"] == pytest.approx([-1.5, -0.5])
    # No row has cluster accuracy here: no such check. The supervised row is never checked.
    assert [claim for claim, _ in checks] == [
        "cmae above mae",
        "cmae above mae",
        "maect above mae by 3 points",
        *(f"{m} above raw pixels" for m in ("mae", "cmae", "maect")),
        "the best self-supervised row at least 89%",
        "the best self-supervised row at least 91%",
    ]
    knn_target = checks["the best self-supervised row at least 89%", "k-NN"]
    assert (knn_target["best"], knn_target["holds"]) == ("maect", False)
    assert knn_target["value"] == pytest.approx(84.0)
    probe_target = checks["the best self-supervised row at least 91%", "linear probe"]
    assert (probe_target["best"], probe_target["holds"]) == ("cmae", True)
    table = representation.orderings_table(list(checks.values()))
    assert "| maect above mae by 3 points | k-NN | +3.50 / +2.50 | +3.00 | 1 of 2 | no |" in table
    # Above in every seed: held.
    results["maect"] = row(0.835, 0.855)
    maect = next(c for c in representation.orderings(results) if "by 3" in c["claim"])
    assert (maect["per_seed"], maect["holds"]) == (pytest.approx([3.5, 3.5]), True)
