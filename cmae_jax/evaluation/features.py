"""Frozen-encoder features: the encoder of any run, raw pixels, extraction over a split.

An evaluation sees an encoder through `Features`: a jitted function images -> {name:
[B, D]} built once (so periodic evaluations during pretraining never re-jit), with the
pooled features of vit.POOLINGS ('cls': the cls token after the final LayerNorm, 'mean',
'cls+mean', 'grid', 'tokens': see EncoderOutput.pooled), or 'pixels' (the flattened
normalised image) for the raw-pixel baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from cmae_jax import sharding, train_state, weights
from cmae_jax.data import pipeline, sources
from cmae_jax.models import vit
from cmae_jax.models.encoder_spec import EncoderSpec


class FeatureEncoder(nn.Module):
    """The ViT encoder of this project (params['encoder'] of any run) and its poolings."""

    encoder: vit.Encoder

    def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """{pooling: features} of whole images, one per name of vit.POOLINGS, float32."""
        return self.encoder(images, None, train=train).pooled()


def encoder_embed(spec: EncoderSpec) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
    """(params, images) -> {pooling: features} of params['encoder'], the encoder that `spec`
    builds: how every trainer's periodic evaluations read the run's encoder."""
    model = FeatureEncoder(spec.encoder())
    return lambda params, images: model.apply({"params": {"encoder": params["encoder"]}}, images)


def build_encoder(config: ml_collections.ConfigDict) -> vit.Encoder:
    """The encoder that config.model and config.input describe (the pretraining models'
    EncoderSpec)."""
    return EncoderSpec.from_config(config.model, config.input).encoder()


def pixel_features(images: jax.Array) -> dict[str, jax.Array]:
    """The raw-pixel baseline: each normalised image flattened to one vector."""
    return {"pixels": images.reshape(images.shape[0], -1).astype(jnp.float32)}


def encoder_feature_fn(
    model: FeatureEncoder | None,
    params: Any,
    out_sharding: NamedSharding,
    keys: tuple[str, ...] = vit.POOLINGS,
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """images -> {key: features} for the pooled features `keys`, jitted once; `model` None
    means raw pixels ({'pixels': ...}, `params` unused)."""
    if model is None:
        return jax.jit(pixel_features, out_shardings=out_sharding)
    select = lambda out: {k: out[k] for k in keys}
    apply = jax.jit(
        lambda p, images: select(model.apply({"params": p}, images)),
        out_shardings=out_sharding,
    )
    return lambda images: apply(params, images)


@dataclasses.dataclass(frozen=True)
class StridedSubset:
    """Every (N / n)-th example of a source, n of them: a class-balanced-ish subset even of
    sources sorted by class (ImageFolder), the same on every host and every call."""

    source: sources.Source
    size: int

    def __post_init__(self) -> None:
        if not 0 < self.size <= self.source.num_examples:
            raise ValueError(
                f"A subset of {self.size} examples needs 0 < size <= {self.source.num_examples}."
            )

    @property
    def num_examples(self) -> int:
        return self.size

    @property
    def channels(self) -> int:
        return self.source.channels

    @property
    def fallible(self) -> bool:
        return self.source.fallible

    @property
    def name(self) -> str:
        return f"{self.source.name} (every {self.source.num_examples / self.size:.3g}th example)"

    def _index(self, index: Any) -> Any:
        return index * self.source.num_examples // self.size

    def tf_lookup(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.source.tf_lookup(self._index(tf.cast(index, tf.int64)))

    def tf_lookup_crop(self, index: tf.Tensor, box_fn: Any) -> dict[str, tf.Tensor]:
        return self.source.tf_lookup_crop(self._index(tf.cast(index, tf.int64)), box_fn)

    def describe(self, index: int) -> str:
        return self.source.describe(self._index(int(index)))


def split_source(config: ml_collections.ConfigDict, split: str, subset: int = 0) -> sources.Source:
    """The eval-view source of `split`, or `subset` > 0 strided examples of it."""
    source = sources.make_source(config.dataset, split)
    if subset and subset < source.num_examples:
        return StridedSubset(source, subset)
    return source


def extract_features(
    feature_fn: Callable[[jax.Array], Any],
    batches: Iterable[dict[str, np.ndarray]],
    batch_sharding: NamedSharding,
) -> tuple[Any, np.ndarray]:
    """Runs `feature_fn` over eval batches; returns (features, labels) of valid rows, on host.

    `feature_fn` returns an array or a tree of arrays (then so is `features`). Every process
    gets all rows (gathered), in dataset order of the batches. Host memory: N x D floats per
    process (5.2 GB for ImageNet's 1.28M x 1024).
    """
    features, labels = [], []
    for local in batches:
        batch = sharding.global_batch(
            {"image": local["image"], "label": local["label"], "valid": local["valid"]},
            batch_sharding,
        )
        out = feature_fn(batch["image"])
        gathered = multihost_utils.process_allgather(
            {"f": out, "y": batch["label"], "v": batch["valid"]}, tiled=True
        )
        valid = np.asarray(gathered["v"], bool)
        features.append(
            jax.tree.map(lambda f, v=valid: np.asarray(f, np.float32)[v], gathered["f"])
        )
        labels.append(np.asarray(gathered["y"], np.int32)[valid])
    return jax.tree.map(lambda *f: np.concatenate(f), *features), np.concatenate(labels)


def features_of_split(
    config: ml_collections.ConfigDict,
    feature_fn: Callable[[jax.Array], Any],
    source: sources.Source,
    batch_sharding: NamedSharding,
) -> tuple[Any, np.ndarray]:
    """(features, labels) of every readable example of `source` (eval view, no augmentation)."""
    batches = pipeline.eval_dataset(
        config,
        source,
        batch_size=config.eval.batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ).as_numpy_iterator()
    return extract_features(feature_fn, batches, batch_sharding)


# -------------------------------------------------------------------- The encoder to evaluate

# config.init values that name no checkpoint.
RANDOM_INIT = ("", "random")
PIXELS = "pixels"
# What an evaluation takes over from the pretraining run's config.json (config.model_from_init):
# the encoder's architecture and the input geometry and normalisation it was trained with.
RUN_INPUT_KEYS = ("image_size", "patch_size", "channels", "mean", "std", "eval_crop_fraction")


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with config.model and the RUN_INPUT_KEYS of config.input replaced by those of
    the run that wrote the checkpoint at config.init (its config.json; for a published
    checkpoint, what its shapes imply and ImageNet's normalisation), when
    config.model_from_init is set and init names a checkpoint; else `config` unchanged.
    A 3-channel encoder on a grey dataset sees the grey value repeated in each channel
    (pipeline.normalize)."""
    if config.init in (*RANDOM_INIT, PIXELS) or not config.get("model_from_init", True):
        return config
    saved = weights.run_config_json(config.init)
    if saved is None:
        logging.warning("No config.json for %s: the encoder follows config.model.", config.init)
        return config
    out = config.copy_and_resolve_references()
    with out.unlocked():
        for key, value in saved["model"].items():
            if key in out.model:
                out.model[key] = value
        for key in RUN_INPUT_KEYS:
            if key in saved["input"]:
                value = saved["input"][key]
                out.input[key] = tuple(value) if isinstance(value, list) else value
    logging.info("Encoder and input geometry from the run of %s: %s", config.init, out.model)
    return out


def load_encoder(
    init: str,
    config: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
    rules: Any = None,
) -> tuple[FeatureEncoder | None, Any]:
    """(model, params) of the encoder to evaluate; params are {'encoder': ...} in their
    sharded layout on `mesh` (default: config.mesh over all devices).

    `init`: a workdir, checkpoints/ folder or step folder of any run of this project (CMAE,
    MAE, a MAE-CT workdir or stage folder) or a published checkpoint (cmae_jax.interop: a
    file or HF folder); '' or 'random' for a randomly initialised
    encoder (seed config.seed); 'pixels' for raw pixels, (None, None). `config` must
    describe that encoder (see resolve_config).
    """
    if init == PIXELS:
        return None, None
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    rules = rules if rules is not None else sharding.logical_axis_rules(config.logical_axis_rules)
    model = FeatureEncoder(build_encoder(config))
    size, channels = config.input.image_size, config.input.channels
    init_fn = lambda rng: model.init(rng, jnp.zeros((2, size, size, channels)))["params"]
    rng = jax.random.key(config.seed)
    if init in RANDOM_INIT:
        params, _, _ = train_state.create_sharded_state(init_fn, rng, mesh, rules)
        return model, params
    _, abstract = train_state.abstract_sharded_state(init_fn, rng, mesh, rules)
    params, _ = weights.load_params(init, abstract)
    return model, params
