"""Every evaluation protocol behind one interface, `run(params) -> {metric: value}`.

`make(name, context)` builds a protocol once (jitted functions, sources); the result is
called with the encoder parameters to evaluate, as often as wanted. The evaluation entry
point (cmae_jax.evaluate) and the evaluations during and after training (the loop's hooks,
cmae_jax.evaluation.hooks) both build their protocols here.

The frozen-feature protocols (knn, linear_probe, low_shot, clustering, pictures) share one
extraction of the train and eval splits per parameters (Context.features).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from jax.sharding import Mesh

from cmae_jax import sharding, visualize
from cmae_jax.data import pipeline, sources
from cmae_jax.evaluation import clustering, features, finetune, knn, linear_probe, low_shot

Protocol = Callable[[Any], dict[str, Any]]
Embed = Callable[[Any, jax.Array], dict[str, jax.Array]]


@dataclasses.dataclass
class Context:
    """What protocols are built from: config, mesh, the encoder's feature function.

    embed        (params, images) -> {pooling: [B, D]} ('cls', 'mean', ... or 'pixels')
    subset       > 0: that many strided examples of each split (periodic evaluations)
    model        the FeatureEncoder (pictures need its attention maps); None for pixels
    finetune_hooks  (config, mesh, embed) -> the periodic evaluations that run while the
                 finetune protocol tunes the encoder (evaluation.hooks builds them)
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    embed: Embed
    rules: Any = None
    writer: metric_writers.MetricWriter | None = None
    workdir: str = ""
    model: features.FeatureEncoder | None = None
    subset: int = 0
    finetune_hooks: finetune.PeriodicHooks | None = None
    _cache: tuple[int, Any] | None = dataclasses.field(default=None, repr=False)
    _apply: Any = dataclasses.field(default=None, repr=False)

    @classmethod
    def for_training(
        cls, config: ml_collections.ConfigDict, mesh: Mesh, embed: Embed, subset: int = 0
    ) -> Context:
        """The context of evaluations inside a trainer (no pictures, no fine-tuning)."""
        return cls(config=config, mesh=mesh, embed=embed, subset=subset)

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return sharding.batch_sharding(self.mesh)

    @property
    def feature(self) -> str:
        """The pooled feature the frozen protocols read."""
        return "pixels" if self._is_pixels() else self.config.eval.feature

    def _is_pixels(self) -> bool:
        return self.config.get("init", None) == features.PIXELS

    def feature_keys(self) -> tuple[str, ...]:
        """The pooled features some protocol of the config reads (host memory: N x D each)."""
        if self._is_pixels():
            return ("pixels",)
        keys = {self.config.eval.feature}
        if "linear_probe" in self.config.get("protocols", ()):
            keys.add(self.config.linear_probe.feature)
        return tuple(sorted(keys))

    def features(self, params: Any) -> tuple[dict, np.ndarray, dict, np.ndarray]:
        """(train features, labels, eval features, labels) of `params`, extracted once per
        parameters object (the frozen protocols of one evaluation share them)."""
        if self._cache is not None and self._cache[0] == id(params):
            return self._cache[1]
        splits = (self.config.eval.train_split, self.config.dataset.eval_split)
        split_sources = [features.split_source(self.config, s, self.subset) for s in splits]
        if self._apply is None:
            keys = self.feature_keys()
            self._apply = jax.jit(
                lambda p, images: {k: v for k, v in self.embed(p, images).items() if k in keys},
                out_shardings=self.batch_sharding,
            )
            # Once: the feature sizes and the splits stay what they are between evaluations.
            self._check_host_memory(params, sum(s.num_examples for s in split_sources))
        start = time.time()
        fn = lambda images: self._apply(params, images)
        out = []
        for source in split_sources:
            out.extend(features.features_of_split(self.config, fn, source, self.batch_sharding))
        logging.info(
            "Features of %d train and %d eval examples in %.0f s",
            len(out[1]),
            len(out[3]),
            time.time() - start,
        )
        self._cache = (id(params), tuple(out))
        return self._cache[1]

    def _check_host_memory(self, params: Any, num_examples: int) -> None:
        """Refuses, before any extraction, features whose two splits would fill more than
        half of this host's memory (every process holds all rows): 'tokens' of a large
        encoder on a large dataset."""
        size, channels = self.config.input.image_size, self.config.input.channels
        images = jax.ShapeDtypeStruct((1, size, size, channels), np.float32)
        shapes = jax.eval_shape(self._apply, params, images)
        per_example = {k: int(np.prod(v.shape[1:])) for k, v in shapes.items()}
        needed = 4 * num_examples * sum(per_example.values())
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if needed > available // 2:
            raise ValueError(
                f"The features {per_example} (numbers per image) of {num_examples:,} images "
                f"need {needed / 2**20:,.1f} MiB of host memory, more than half of this "
                f"host's {available / 2**20:,.0f} MiB. Read a pooled feature (config.eval.feature="
                "'cls' or 'grid', config.linear_probe.feature likewise) or, during training, "
                "a subset (config.eval.knn_subset, config.evals.<name>.subset)."
            )


# -------------------------------------------------------------------- The protocols


def _knn(ctx: Context) -> Protocol:
    num_classes = ctx.config.dataset.num_classes

    def run(params: Any) -> dict[str, Any]:
        train, train_labels, test, test_labels = ctx.features(params)
        predictions = knn.knn_predict(
            train[ctx.feature],
            train_labels,
            test[ctx.feature],
            k=ctx.config.eval.knn_k,
            temperature=ctx.config.eval.knn_temperature,
            num_classes=num_classes,
            chunk_size=ctx.config.eval.get("knn_chunk_size", 1024),
            mesh=ctx.mesh,
        )
        # Which classes an encoder loses where another wins (e.g. against the pixels): the
        # per-class numbers and the confusions, beside the one top-1.
        confusion = knn.confusion_matrix(test_labels, predictions, num_classes)
        return {
            "knn_top1": float(np.trace(confusion) / confusion.sum()),
            "knn_top1_per_class": knn.per_class_accuracy(confusion),
            "knn_confusion": confusion.tolist(),
        }

    return run


def _linear_probe(ctx: Context) -> Protocol:
    config = ctx.config
    probe_feature = "pixels" if ctx._is_pixels() else config.linear_probe.feature
    embed = None
    if not ctx._is_pixels():
        embed = lambda p, images: ctx.embed(p, images)[probe_feature]

    def run(params: Any) -> dict[str, Any]:
        train, train_labels, test, test_labels = ctx.features(params)
        probe = linear_probe.train_and_evaluate(
            config,
            ctx.mesh,
            ctx.rules,
            embed=embed,
            encoder_params=params,
            train_features=train[probe_feature],
            train_labels=train_labels,
            test_features=test[probe_feature],
            test_labels=test_labels,
            writer=ctx.writer,
        )
        return {"linear_probe_top1": probe["top1"]}

    return run


def _low_shot(ctx: Context) -> Protocol:
    config = ctx.config

    def run(params: Any) -> dict[str, Any]:
        train, train_labels, test, test_labels = ctx.features(params)
        shots = low_shot.evaluate_low_shot(
            train[ctx.feature],
            train_labels,
            test[ctx.feature],
            test_labels,
            num_classes=config.dataset.num_classes,
            shots=tuple(config.low_shot.shots),
            fractions=tuple(config.low_shot.fractions),
            seeds=tuple(config.low_shot.seeds),
            l2=config.low_shot.l2,
            num_steps=config.low_shot.num_steps,
        )
        return {f"low_shot_{name}_top1": value for name, value in shots.items()}

    return run


def _clustering(ctx: Context) -> Protocol:
    config = ctx.config

    def run(params: Any) -> dict[str, Any]:
        train, train_labels, test, test_labels = ctx.features(params)
        on_train = config.clustering.split == config.eval.train_split
        feats, labels = (train, train_labels) if on_train else (test, test_labels)
        return clustering.evaluate_clustering(
            feats[ctx.feature],
            labels,
            num_classes=config.dataset.num_classes,
            seed=config.seed,
            num_init=config.clustering.num_init,
            num_iters=config.clustering.num_iters,
        )

    return run


def _finetune(ctx: Context) -> Protocol:
    def run(params: Any) -> dict[str, Any]:
        tuned = finetune.train_and_evaluate(
            ctx.config,
            ctx.workdir,
            params,
            writer=ctx.writer,
            periodic_hooks=ctx.finetune_hooks,
        )
        return {"finetune_top1": tuned["top1"]}

    return run


def _pictures(ctx: Context) -> Protocol:
    def run(params: Any) -> dict[str, Any]:
        _, _, test, test_labels = ctx.features(params)
        write_pictures(ctx, params, test[ctx.feature], test_labels)
        return {}

    return run


REGISTRY: dict[str, Callable[[Context], Protocol]] = {
    "knn": _knn,
    "linear_probe": _linear_probe,
    "low_shot": _low_shot,
    "clustering": _clustering,
    "finetune": _finetune,
    "pictures": _pictures,
}
NAMES = tuple(REGISTRY)


def make(name: str, ctx: Context) -> Protocol:
    """The protocol `name` of REGISTRY, built for `ctx`."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown evaluation protocol {name!r}; known: {', '.join(NAMES)}.")
    return REGISTRY[name](ctx)


# -------------------------------------------------------------------- Pictures


def write_pictures(
    ctx: Context, params: Any, test_features: np.ndarray, test_labels: np.ndarray
) -> None:
    """Attention maps of the first eval images and a PCA plot of (a subset of) the eval
    features: TensorBoard images and WORKDIR/pictures/*.png."""
    config = ctx.config
    upscale = max(1, 96 // config.input.image_size)
    pictures = {}
    if ctx.model is not None:
        source = features.split_source(config, config.dataset.eval_split)
        batch = next(
            pipeline.eval_dataset(
                config, source, batch_size=config.pictures.num_images
            ).as_numpy_iterator()
        )
        maps = visualize.attention_maps(ctx.model, jax.device_get(params), batch["image"])
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
        title=f"PCA of {config.get('init', '') or 'random'}",
    )
    if ctx.writer is not None:
        ctx.writer.write_images(0, {name: image[None] for name, image in pictures.items()})
    if jax.process_index() == 0:
        for name, image in pictures.items():
            visualize.write_png(os.path.join(ctx.workdir, "pictures", f"{name}.png"), image)
