r"""Time to first step of `python -m cmae_jax.main`, cold and warm compilation cache.

    python benchmarks/startup.py                                   # the Fashion-MNIST CMAE demo
    python benchmarks/startup.py --config=configs/fashion_mnist_mae.py --runs=cold,warm,off
    python benchmarks/startup.py --set=model.depth=2      # any --config.KEY=VALUE, every run

Runs the command to its first logged training step (--config.total_steps=1, no k-NN) in
fresh processes and workdirs: 'cold' with an empty persistent compilation cache, 'warm'
with the cache the cold run filled (a rerun or a resumed run), 'off' with the cache turned
off (--config.compilation_cache_dir=''). Every line the run logs is timestamped on
arrival; the table splits the time into imports and start-up up to the config line, each
compilation JAX reports (JAX_LOG_COMPILES), and the rest (data source, input pipeline
start, running the init and the first step).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILED = re.compile(r"Finished XLA compilation of jit\((.+?)\) in ([\d.e-]+) sec")
CACHE_HIT = "Persistent compilation cache hit"


def timed_lines(command: list[str], env: dict[str, str], until: str) -> list[tuple[float, str]]:
    """(seconds since start, line) for each stderr/stdout line, up to the first holding `until`."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
        if until in line:
            break
    process.kill()
    process.wait()
    if not lines or until not in lines[-1][1]:
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"The run ended before logging {until!r}:\n{tail}")
    return lines


def phases(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds per phase of one run (see the module docstring)."""
    config_at = next(t for t, line in lines if "main.py" in line and "Config:" in line)
    compiles: dict[str, float] = collections.defaultdict(float)
    for _, line in lines:
        found = COMPILED.search(line)
        if found:
            name = "step" if found.group(1) == "train_step" else found.group(1)
            name = "init" if name == "<lambda>" else name
            compiles[name if name in ("step", "init") else "other"] += float(found.group(2))
    first_step = lines[-1][0]
    result = {"imports and start-up": config_at}
    result.update({f"compile {k}": v for k, v in sorted(compiles.items())})
    result["data, pipeline start, init and first step"] = (
        first_step - config_at - sum(compiles.values())
    )
    result["cache hits"] = sum(CACHE_HIT in line for _, line in lines)
    result["total to first step"] = first_step
    return result


def main() -> None:
    """Runs the command per --runs and prints a Markdown table of the phases."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/fashion_mnist_cmae.py")
    parser.add_argument("--runs", default="cold,warm", help="cold, warm and/or off, in order")
    parser.add_argument(
        "--set", action="append", default=[], help="KEY=VALUE: --config.KEY=VALUE for every run"
    )
    args = parser.parse_args()
    env = {**os.environ, "JAX_LOG_COMPILES": "1"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="cmae_startup_") as tmp:
        cache = os.path.join(tmp, "cache")
        for run in args.runs.split(","):
            command = [
                sys.executable,
                "-m",
                "cmae_jax.main",
                f"--config={args.config}",
                f"--workdir={os.path.join(tmp, run)}",
                "--config.total_steps=1",
                "--config.eval.knn=False",
                f"--config.compilation_cache_dir={'' if run == 'off' else cache}",
                "--alsologtostderr",
                *(f"--config.{pair.removeprefix('config.')}" for pair in args.set),
            ]
            results[run] = phases(timed_lines(command, env, until="step 1/"))
            print(f"{run}: {results[run]['total to first step']:.1f} s to the first step")
    names = list(dict.fromkeys(k for r in results.values() for k in r))
    print(f"\n| seconds | {' | '.join(results)} |\n|---|{'---|' * len(results)}")
    for name in names:
        cells = [
            f"{r.get(name, 0):.1f}" if name != "cache hits" else str(r[name])
            for r in results.values()
        ]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
