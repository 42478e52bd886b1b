r"""MAE on real Fashion-MNIST: the CMAE demo without the contrastive branch, for comparison.

Command:
  python -m cmae_jax.main --config=configs/fashion_mnist_mae.py --workdir=workdirs/fmnist_mae

Same encoder, data (native 28 px, patch 7), schedule (5 epochs) and k-NN evaluation as
configs/fashion_mnist_cmae.py, with contrastive_weight 0 (no target view, no target forward
pass), random masking at 0.75, and no RandomResizedCrop: MAE sees each whole image (and its
mirror image), as the evaluation does, and as CMAE's online view does since 2026-12-07. Its
step has 46% of the CMAE demo's FLOPs (0.024 against 0.053 GFLOP per image). Expected: `k-NN
top-1: 81.65%` (2026-12-06, pinned to one core while another job used the other: 6 min 31 s;
that machine's 2 idle cores measured an XLA float32 matmul of 156-204 GFLOP/s). With the
crops of 20-100% of the image that it used until then
(--config.input.crop_scale='(0.2,1.0)'), 79.46% (80.09% with the per-example views of
--config.input.batched_views=False, the same to the digit on the machines of 2026-12-02,
12-03 and 12-04); over seeds 0-3 (--config.seed=N) the whole images gave 81.65 / 82.07 /
81.43 / 81.63% against 79.46 / 80.64 / 80.10 / 80.73% (README "Does it learn?").
"""

from cmae_jax.config_defaults import fashion_mnist_config


def get_config():
    """Fashion-MNIST MAE config."""
    return fashion_mnist_config("mae")
