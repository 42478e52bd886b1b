"""Evaluation of an encoder by the SPEC's protocols, top to bottom (config.method = 'eval').

  python -m cmae_jax.main --config=configs/eval/all.py --config.init=WORKDIR --workdir=DIR

config.init names the encoder: any checkpoint of this project (a CMAE / MAE workdir, a
MAE-CT workdir or stage folder, a checkpoints/ or step folder), '' / 'random' for a
randomly initialised one, 'pixels' for raw pixels. config.protocols picks what runs, from
cmae_jax.evaluation.protocols.REGISTRY:

  knn           weighted k-NN (cosine, k, exp(s / T) votes), bank sharded over devices
  linear_probe  BatchNorm (no affine) + Linear on the frozen encoder, LARS or SGD
  low_shot      logistic regression on 1 / 2 / 5 images per class and 1% / 10% of labels
  clustering    k-means with k = classes; cluster accuracy (Hungarian) and NMI
  finetune      the whole encoder, layer decay, drop path, mixup / cutmix, RandAugment
  pictures      cls-token attention maps and a 2-D PCA plot of the features

The frozen-feature protocols share one extraction of the train and eval splits. Results
land in DIR/eval_results.json, as TensorBoard scalars (and pictures) in DIR, and as lines
`<metric>: NN.NN%` on stdout.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import ml_collections

from cmae_jax import loop, sharding, writers
from cmae_jax import workdir as workdir_files
from cmae_jax.evaluation import features, hooks, protocols


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs config.protocols on the encoder config.init names; returns the flat results."""
    loop.check_workdir(workdir, "eval")
    is_chief = jax.process_index() == 0
    writer = writers.create_writer(workdir, is_chief=is_chief)
    config = features.resolve_config(config)
    if is_chief:
        workdir_files.write_json(workdir, "config.json", config)

    # ---------------------------------------------------------------- Mesh and encoder
    mesh, rules = sharding.mesh_and_rules(config)
    model, params = features.load_encoder(config.init, config, mesh, rules)
    if model is None:
        embed = lambda p, images: features.pixel_features(images)
    else:
        embed = lambda p, images: model.apply({"params": p}, images)
    context = protocols.Context(
        config=config,
        mesh=mesh,
        embed=embed,
        rules=rules,
        writer=writer,
        workdir=workdir,
        model=model,
        finetune_hooks=functools.partial(hooks.make_hooks, types=("periodic",)),
    )

    # ---------------------------------------------------------------- Protocols
    results: dict[str, Any] = {"init": config.init}
    seconds: dict[str, float] = {}
    for name in config.protocols:
        start = time.time()
        results.update(protocols.make(name, context)(params))
        seconds[name] = round(time.time() - start, 1)

    # ---------------------------------------------------------------- Results
    results["seconds"] = seconds
    scalars = {k: v for k, v in results.items() if isinstance(v, float)}
    writer.write_scalars(0, scalars)
    writer.flush()
    if is_chief:
        workdir_files.write_json(workdir, "eval_results.json", results)
    for name, value in scalars.items():
        if name != "knn_top1":  # main prints the k-NN line last
            print(f"{name}: {100 * value:.2f}%", flush=True)
    return results
