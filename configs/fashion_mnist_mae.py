r"""MAE on real Fashion-MNIST: the CMAE demo without the contrastive branch, for comparison.

Command:
  python -m cmae_jax.main --config=configs/fashion_mnist_mae.py --workdir=workdirs/fmnist_mae

Same encoder, data (native 28 px, patch 7), schedule (5 epochs) and k-NN evaluation as
configs/fashion_mnist_cmae.py, with contrastive_weight 0 (no target view, no target forward
pass) and random masking at 0.75. Its step has 46% of the CMAE demo's FLOPs
(0.024 against 0.053 GFLOP per image). Expected: `k-NN top-1: 80.09%`, the same to the
digit on the machines of 2026-12-02, 12-03 and 12-04 (each pinned to one core); 8 min 41 s
on one core on 2026-12-04 while another job used the other (XLA float32 2048^3 matmul
147-205 GFLOP/s on both cores).
"""

from cmae_jax.config_defaults import fashion_mnist_config


def get_config():
    """Fashion-MNIST MAE config."""
    return fashion_mnist_config("mae")
