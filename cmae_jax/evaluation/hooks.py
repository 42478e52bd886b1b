"""config.evals as hooks of the training loop: evaluations of the encoder during and after
training, and the pictures a trainer draws.

Each entry `config.evals.<name> = dict(type=..., every_steps=..., at_stop=..., at_end=...,
...)` becomes one cmae_jax.hooks.Hook (every_steps 0 and no at_stop / at_end: off). Types:

  periodic         config.eval.periodic_protocols-style protocols (`protocols`: names of
                   cmae_jax.evaluation.protocols.REGISTRY that need no pictures or training
                   of their own) on `subset` strided examples of each split (0: all);
                   metrics <metric><suffix>_subset
  knn              the k-NN of config.eval (knn_k, knn_temperature, feature) on the whole
                   splits; metrics knn_top1<suffix>
  reconstructions  the trainer's own pictures (trainers with a pixel decoder); a trainer
                   that has none skips the entry

<suffix> names the encoder evaluated: '' for the one encoder, '_raw' / '_ema' for a stage
that keeps an EMA encoder (the trainer's `params_of`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging
from jax.sharding import Mesh

from cmae_jax import loop
from cmae_jax.evaluation import protocols
from cmae_jax.hooks import Hook, Scalars

ParamsOf = Callable[[Any], dict[str, Any]]
HookFn = Callable[[int, Any], Scalars]
# Types whose work a trainer supplies itself (`own` of make_hooks).
TRAINER_TYPES = ("reconstructions",)
# The protocols a periodic entry can run: no pictures, no training of their own.
PERIODIC_PROTOCOLS = ("knn", "low_shot", "clustering")


def encoder_params(state: Any) -> dict[str, Any]:
    """The one encoder of a train state, under suffix ''."""
    return {"": state.params}


def _each_encoder(params_of: ParamsOf, evaluate: Callable[[Any], Scalars], tail: str) -> HookFn:
    """A hook that runs `evaluate` (params -> metrics) on every encoder of the state; metric
    names get the encoder's suffix and `tail`, the log the metrics and the seconds taken."""

    def hook(step: int, state: Any) -> Scalars:
        scalars: Scalars = {}
        for suffix, params in params_of(state).items():
            start = time.time()
            # Scalars only: the k-NN's per-class numbers and confusions are for the
            # evaluation command's eval_results.json, not for the metric writers.
            metrics = {
                f"{k}{suffix}{tail}": v for k, v in evaluate(params).items() if isinstance(v, float)
            }
            logging.info("step %d | %s in %.0f s", step, metrics, time.time() - start)
            scalars.update(metrics)
        return scalars

    return hook


def _periodic(
    name: str,
    entry: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    embed: protocols.Embed,
    params_of: ParamsOf,
) -> HookFn:
    unusable = [p for p in entry.protocols if p not in PERIODIC_PROTOCOLS]
    if unusable:
        raise loop.StartError(
            f"config.evals.{name}.protocols holds {', '.join(map(repr, unusable))}; during "
            f"training only {', '.join(PERIODIC_PROTOCOLS)} can run (the others run in "
            "configs/eval/ after training)."
        )
    context = protocols.Context.for_training(config, mesh, embed, subset=entry.subset)
    runs = [protocols.make(name, context) for name in entry.protocols]

    def evaluate(params: Any) -> Scalars:
        metrics: Scalars = {}
        for run in runs:
            metrics.update(run(params))
        return metrics

    return _each_encoder(params_of, evaluate, "_subset")


def _knn(
    name: str,
    entry: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    embed: protocols.Embed,
    params_of: ParamsOf,
) -> HookFn:
    del name, entry  # the k-NN's parameters are config.eval's, as the evaluation command's
    knn = protocols.make("knn", protocols.Context.for_training(config, mesh, embed))
    return _each_encoder(params_of, knn, "")


BUILDERS = {"periodic": _periodic, "knn": _knn}
TYPES = (*BUILDERS, *TRAINER_TYPES)


def make_hooks(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    embed: protocols.Embed,
    *,
    params_of: ParamsOf = encoder_params,
    own: Mapping[str, HookFn] | None = None,
    types: Sequence[str] = TYPES,
) -> list[Hook]:
    """The hooks of config.evals, in its order: `embed` (params, images) -> pooled features
    of the encoder that `params_of` (state -> {suffix: params}) picks; `own` the trainer's
    work for TRAINER_TYPES it supports; entries of other `types` than those are left out."""
    own = own or {}
    hooks = []
    for name, entry in config.get("evals", {}).items():
        kind = entry.get("type", "")
        if kind not in TYPES:
            raise loop.StartError(
                f"config.evals.{name}.type={kind!r} is not an evaluation type; known: "
                f"{', '.join(TYPES)}. Fix or remove config.evals.{name}."
            )
        if kind not in types:
            continue
        when = dict(
            every_steps=int(entry.get("every_steps", 0) or 0),
            at_stop=bool(entry.get("at_stop", False)),
            at_end=bool(entry.get("at_end", False)),
        )
        if not any(when.values()):
            continue  # off
        if kind in BUILDERS:
            hooks.append(
                Hook(name, BUILDERS[kind](name, entry, config, mesh, embed, params_of), **when)
            )
        elif kind in own:
            hooks.append(Hook(name, own[kind], **when))
        # else: this trainer has nothing of that kind (e.g. no pixel decoder to picture)
    return hooks
