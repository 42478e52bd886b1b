"""Projection / prediction MLP heads with BatchNorm (CMAE, BYOL/NNCLR style).

CMAE projector:   MLPHead(1536, 256)                    d -> 1536 -> BN -> ReLU -> 256 (no bias)
CMAE predictor:   MLPHead(1536, 256)                    256 -> 1536 -> BN -> ReLU -> 256
NNCLR projector:  MLPHead(2048, 256, num_layers=3, hidden_bias=False, last_bn=True,
                          torch_init=True)
NNCLR predictor:  MLPHead(4096, 256, hidden_bias=False, torch_init=True)  (no bias anywhere)
MoCo v3 projector: MLPHead(4096, 256, num_layers=3, hidden_bias=False, last_bn=True,
                           last_bn_affine=False, torch_init=True)
MoCo v3 predictor: MLPHead(4096, 256, hidden_bias=False, last_bn=True, last_bn_affine=False,
                           torch_init=True)
(the NNCLR and MoCo v3 pairs: projector_and_predictor)

The CMAE heads follow the MAE family's init (xavier-uniform kernels, zero biases); the
official MAE-CT heads keep torch.nn.Linear's default, which `torch_init` reproduces.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmae_jax.models import vit

Dtype = Any

# torch BatchNorm1d defaults: momentum 0.1 (flax counts the other way: 1 - 0.1), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5


def torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
    """torch.nn.Linear's default init of its weight (kaiming_uniform with a = sqrt(5)) and of
    its bias, both U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class MLPHead(nn.Module):
    """[Dense -> BatchNorm -> ReLU] x (num_layers - 1) -> Dense (-> BatchNorm if last_bn).

    BatchNorm statistics live in the `batch_stats` collection. Under jax.jit with the batch
    sharded over devices, the batch mean/variance is computed over the *global* batch (jit
    sees the whole logical array and inserts the cross-device reductions), so no axis_name
    or explicit all-reduce is needed. Unlike torch, the running variance is updated with
    the biased batch variance (flax's BatchNorm), a negligible difference at these batch sizes.
    """

    hidden_dim: int
    out_dim: int
    num_layers: int = 2
    hidden_bias: bool = True
    last_bias: bool = False
    last_bn: bool = False
    # False: the last BatchNorm only normalises (no scale, no bias), as MoCo v3's heads.
    last_bn_affine: bool = True
    dtype: Dtype = jnp.float32
    # Logical name of the input features ('embed' after an encoder, 'proj' after a
    # projector), so that the first kernel is split over fsdp like the encoder's.
    in_axis: str | None = None
    # Linear layers initialised as torch.nn.Linear's default (torch_linear_init) instead of
    # xavier-uniform kernels and zero biases.
    torch_init: bool = False

    def _dense(self, x: jax.Array, features: int, axes: tuple, name: str, bias: bool) -> jax.Array:
        init = {}
        if self.torch_init:
            init = dict(kernel_init=torch_linear_init(x.shape[-1]))
            init["bias_init"] = init["kernel_init"]
        return vit.dense(features, axes, self.dtype, name, bias, **init)(x)

    def _batch_norm(
        self, train: bool, axis_name: str | None, name: str, affine: bool = True
    ) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            use_scale=affine,
            use_bias=affine,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPS,
            dtype=self.dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
        x = x.astype(self.dtype)
        for i in range(self.num_layers - 1):
            # A hidden->hidden layer would name 'mlp' twice, so its input axis stays unnamed.
            axes = (self.in_axis if i == 0 else None, "mlp")
            x = self._dense(x, self.hidden_dim, axes, f"dense_{i}", self.hidden_bias)
            x = nn.with_logical_constraint(x, ("batch", "activation_mlp"))
            x = self._batch_norm(train, "mlp", f"bn_{i}")(x)
            x = nn.relu(x)
        last = self.num_layers - 1
        in_axis = "mlp" if last else self.in_axis
        x = self._dense(x, self.out_dim, (in_axis, "proj"), f"dense_{last}", self.last_bias)
        if self.last_bn:
            x = self._batch_norm(train, "proj", f"bn_{last}", self.last_bn_affine)(x)
        return nn.with_logical_constraint(x, ("batch", None))


def projector_and_predictor(
    projector_hidden: int,
    predictor_hidden: int,
    projection_dim: int,
    *,
    predictor_last_bn: bool,
    last_bn_affine: bool = True,
    in_axes: tuple[str | None, str | None] = (None, None),
) -> tuple[MLPHead, MLPHead]:
    """The two-view heads of MAE-CT (NNCLR) and MoCo v3: a 3-layer projector ending in a
    BatchNorm and a 2-layer predictor, no hidden biases, torch.nn.Linear's init, float32
    whatever the encoder's dtype (BatchNorm, temperature-scaled logits). `in_axes`: the
    logical names of the projector's and the predictor's input features."""
    projector = MLPHead(
        projector_hidden,
        projection_dim,
        num_layers=3,
        hidden_bias=False,
        last_bn=True,
        last_bn_affine=last_bn_affine,
        in_axis=in_axes[0],
        torch_init=True,
    )
    predictor = MLPHead(
        predictor_hidden,
        projection_dim,
        hidden_bias=False,
        last_bn=predictor_last_bn,
        last_bn_affine=last_bn_affine,
        in_axis=in_axes[1],
        torch_init=True,
    )
    return projector, predictor
