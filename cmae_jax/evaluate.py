"""Evaluation of an encoder by the SPEC's protocols, top to bottom (config.method = 'eval').

  python -m cmae_jax.main --config=configs/eval/all.py --config.init=WORKDIR --workdir=DIR

config.init names the encoder: any checkpoint of this project (a CMAE / MAE workdir, a
MAE-CT workdir or stage folder, a checkpoints/ or step folder), '' / 'random' for a
randomly initialised one, 'pixels' for raw pixels. config.protocols picks what runs:

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

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from cmae_jax import sharding, visualize
from cmae_jax import workdir as workdir_files
from cmae_jax.data import pipeline, sources
from cmae_jax.evaluation import clustering, features, finetune, knn, linear_probe, low_shot

PROTOCOLS = ("knn", "linear_probe", "low_shot", "clustering", "finetune", "pictures")
# The protocols that read frozen features of the train and eval splits.
FROZEN = ("knn", "linear_probe", "low_shot", "clustering", "pictures")


def _print(name: str, value: float) -> None:
    print(f"{name}: {100 * value:.2f}%", flush=True)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs config.protocols on the encoder config.init names; returns the flat results."""
    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    config = features.resolve_config(config)
    if is_chief:
        workdir_files.write_json(workdir, "config.json", config)
    results: dict[str, Any] = {"init": config.init}
    seconds: dict[str, float] = {}
    num_classes = config.dataset.num_classes

    # ---------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.logical_axis_rules)
    batch_sharding = sharding.batch_sharding(mesh)

    # ---------------------------------------------------------------- Encoder
    model, params = features.load_encoder(config.init, config, mesh, rules)
    # Only the pooled features some protocol reads are kept (host memory: N x D each).
    keys = {config.eval.feature}
    if "linear_probe" in config.protocols:
        keys.add(config.linear_probe.feature)
    feature_fn = features.encoder_feature_fn(model, params, batch_sharding, tuple(sorted(keys)))
    pixels = model is None
    feature = "pixels" if pixels else config.eval.feature

    # ---------------------------------------------------------------- Frozen features
    train_features = train_labels = test_features = test_labels = None
    if set(config.protocols) & set(FROZEN):
        start = time.time()
        train_features, train_labels = features.features_of_split(
            config,
            feature_fn,
            features.split_source(config, config.eval.train_split),
            batch_sharding,
        )
        test_features, test_labels = features.features_of_split(
            config,
            feature_fn,
            features.split_source(config, config.dataset.eval_split),
            batch_sharding,
        )
        seconds["features"] = round(time.time() - start, 1)
        logging.info(
            "Features of %d train and %d test examples in %.0f s",
            len(train_labels),
            len(test_labels),
            seconds["features"],
        )

    def timed(name, fn):
        start = time.time()
        out = fn()
        seconds[name] = round(time.time() - start, 1)
        return out

    # ---------------------------------------------------------------- k-NN
    if "knn" in config.protocols:
        results["knn_top1"] = timed(
            "knn",
            lambda: knn.knn_accuracy(
                train_features[feature],
                train_labels,
                test_features[feature],
                test_labels,
                k=config.eval.knn_k,
                temperature=config.eval.knn_temperature,
                num_classes=num_classes,
                chunk_size=config.eval.knn_chunk_size,
                mesh=mesh,
            ),
        )

    # ---------------------------------------------------------------- Linear probe
    if "linear_probe" in config.protocols:
        probe_feature = "pixels" if pixels else config.linear_probe.feature
        embed = None
        if not pixels:
            embed = lambda p, images: model.apply({"params": p}, images)[probe_feature]
        probe = timed(
            "linear_probe",
            lambda: linear_probe.train_and_evaluate(
                config,
                mesh,
                rules,
                embed=embed,
                encoder_params=params,
                train_features=train_features[probe_feature],
                train_labels=train_labels,
                test_features=test_features[probe_feature],
                test_labels=test_labels,
                writer=writer,
            ),
        )
        results["linear_probe_top1"] = probe["top1"]

    # ---------------------------------------------------------------- Low-shot
    if "low_shot" in config.protocols:
        shots = timed(
            "low_shot",
            lambda: low_shot.evaluate_low_shot(
                train_features[feature],
                train_labels,
                test_features[feature],
                test_labels,
                num_classes=num_classes,
                shots=tuple(config.low_shot.shots),
                fractions=tuple(config.low_shot.fractions),
                seeds=tuple(config.low_shot.seeds),
                l2=config.low_shot.l2,
                num_steps=config.low_shot.num_steps,
            ),
        )
        results.update({f"low_shot_{name}_top1": value for name, value in shots.items()})

    # ---------------------------------------------------------------- Clustering
    if "clustering" in config.protocols:
        on_train = config.clustering.split == config.eval.train_split
        cluster_features, cluster_labels = (
            (train_features, train_labels) if on_train else (test_features, test_labels)
        )
        results.update(
            timed(
                "clustering",
                lambda: clustering.evaluate_clustering(
                    cluster_features[feature],
                    cluster_labels,
                    num_classes=num_classes,
                    seed=config.seed,
                    num_init=config.clustering.num_init,
                    num_iters=config.clustering.num_iters,
                ),
            )
        )

    # ---------------------------------------------------------------- Fine-tuning
    if "finetune" in config.protocols:
        tuned = timed(
            "finetune",
            lambda: finetune.train_and_evaluate(
                config, workdir, mesh, rules, init=config.init, writer=writer
            ),
        )
        results["finetune_top1"] = tuned["top1"]

    # ---------------------------------------------------------------- Pictures
    if "pictures" in config.protocols:
        timed(
            "pictures",
            lambda: write_pictures(
                config, workdir, writer, model, params, test_features[feature], test_labels
            ),
        )

    # ---------------------------------------------------------------- Results
    results["seconds"] = seconds
    scalars = {k: v for k, v in results.items() if isinstance(v, float)}
    writer.write_scalars(0, scalars)
    writer.flush()
    if is_chief:
        workdir_files.write_json(workdir, "eval_results.json", results)
    for name, value in scalars.items():
        if name != "knn_top1":  # main prints the k-NN line last
            _print(name, value)
    return results


def write_pictures(
    config: ml_collections.ConfigDict,
    workdir: str,
    writer: Any,
    model: features.FeatureEncoder | None,
    params: Any,
    test_features: np.ndarray,
    test_labels: np.ndarray,
) -> None:
    """Attention maps of the first eval images and a PCA plot of (a subset of) the eval
    features: TensorBoard images and DIR/pictures/*.png."""
    upscale = max(1, 96 // config.input.image_size)
    pictures = {}
    if model is not None:
        source = features.split_source(config, config.dataset.eval_split)
        batch = next(
            pipeline.eval_dataset(
                config, source, batch_size=config.pictures.num_images
            ).as_numpy_iterator()
        )
        maps = visualize.attention_maps(model, jax.device_get(params), batch["image"])
        pictures["attention"] = visualize.attention_grid(
            batch["image"], maps, mean=config.input.mean, std=config.input.std, upscale=upscale
        )
    chosen = np.random.default_rng(config.seed).permutation(len(test_labels))
    chosen = np.sort(chosen[: config.pictures.embedding_points])
    names = sources.FASHION_MNIST_CLASSES if config.dataset.name == "fashion_mnist" else None
    pictures["embedding"] = visualize.embedding_plot(
        test_features[chosen],
        test_labels[chosen],
        class_names=names,
        title=f"PCA of {config.init or 'random'}",
    )
    writer.write_images(0, {name: image[None] for name, image in pictures.items()})
    if jax.process_index() == 0:
        for name, image in pictures.items():
            visualize.write_png(os.path.join(workdir, "pictures", f"{name}.png"), image)
