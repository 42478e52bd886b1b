"""MAE: the CMAE step with the contrastive branch off (no target view, no EMA target).

The method module of 'mae' (cmae_jax.methods): its own defaults (MAE's random masking of
75%, contrastive weight 0) and one extra check; everything else is cmae_jax.methods.cmae's.
"""

import dataclasses

import ml_collections

from cmae_jax import methods
from cmae_jax.config_checks import require
from cmae_jax.methods import cmae


def set_defaults(config: ml_collections.ConfigDict) -> None:
    """MAE's keys (SPEC): no target view, random masking of 75%, no contrastive loss."""
    config.input.target_view = False
    config.input.mask_type = "random"
    config.input.mask_ratio = 0.75
    config.loss.contrastive_weight = 0.0


def validate(config: ml_collections.ConfigDict, checks: methods.Checks) -> None:
    """CMAE's checks, and no contrastive weight (MAE has no contrastive branch)."""
    require(
        config.loss.contrastive_weight <= 0,
        f"config.method={config.method!r} has no contrastive branch but "
        f"config.loss.contrastive_weight={config.loss.contrastive_weight}; set it to 0 or "
        "use method='cmae'.",
    )
    cmae.validate(config, checks)


METHOD = dataclasses.replace(cmae.METHOD, name="mae", defaults=set_defaults, validate=validate)
