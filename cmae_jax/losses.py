"""Pretraining losses: normalised-pixel reconstruction and InfoNCE."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-patch normalised pixels, the MAE reconstruction target.

    The variance is the unbiased one (ddof=1), as torch.Tensor.var in the official code.
    """
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + eps)


def take_patches(tokens: jax.Array, ids: jax.Array) -> jax.Array:
    """Gathers tokens [B, N, D] at per-example indices [B, M] -> [B, M, D]."""
    return jnp.take_along_axis(tokens, ids[..., None], axis=1)


def reconstruction_loss(
    pred: jax.Array, target_patches: jax.Array, ids_mask: jax.Array, norm_pix: bool = True
) -> jax.Array:
    """MSE averaged within each patch, then over the masked patches of the batch."""
    pred_masked = take_patches(pred, ids_mask).astype(jnp.float32)
    target_masked = take_patches(target_patches, ids_mask).astype(jnp.float32)
    if norm_pix:
        target_masked = normalize_patches(target_masked)
    return jnp.mean(jnp.square(pred_masked - target_masked))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Unit-norm rows, safe at zero (as torch.nn.functional.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def info_nce(queries: jax.Array, keys: jax.Array, temperature: float) -> jax.Array:
    """InfoNCE of each query against all keys of the global batch, positives on the diagonal.

    The loss is scaled by 2 * temperature as in MoCo v3 (and the official CMAE code), which
    keeps its gradient magnitude independent of the temperature. Keys get no gradient: they
    come from the EMA target branch. The negatives are the whole global batch: under jit
    the keys are gathered from every device, and the [B, B] logits are constrained to rows
    over the batch axes and columns over 'activation_negatives' (tensor), so no device
    ever holds them whole.
    """
    q = l2_normalize(queries)
    k = jax.lax.stop_gradient(l2_normalize(keys))
    logits = nn.with_logical_constraint(q @ k.T / temperature, ("batch", "activation_negatives"))
    # The positive logit of row i is q_i . k_i: a row-wise product instead of the diagonal
    # of the sharded logits, which would need its own gather.
    positives = jnp.sum(q * k, axis=-1) / temperature
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positives)
    return loss * 2.0 * temperature
