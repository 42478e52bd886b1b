r"""MAE on real Fashion-MNIST: the CMAE demo without the contrastive branch, for comparison.

Command:
  python -m cmae_jax.main --config=configs/fashion_mnist_mae.py --workdir=workdirs/fmnist_mae

Same encoder, data (native 28 px, patch 7), schedule (5 epochs) and k-NN evaluation as
configs/fashion_mnist_cmae.py, with contrastive_weight 0 (no target view, no target forward
pass), random masking at 0.75, and no RandomResizedCrop: MAE sees each whole image (and its
mirror image), as the evaluation does, and as CMAE's online view does since 2026-12-07. Its
step has 46% of the CMAE demo's FLOPs (0.024 against 0.053 GFLOP per image). Expected: over
seeds 0-3 (--config.seed=N, each pinned to one core beside another run, 2026-12-07: 5 to 7
minutes) `k-NN top-1:` 82.70 / 82.63 / 82.28 / 82.08%, with the lr held at its peak after
the warmup (the default since 2026-12-07 22:00). With the cosine decay before it
(--config.optimizer.schedule=cosine) 81.65 / 82.07 / 81.43 / 81.63% (seed 0 in 6 min 31 s
on one core beside another run, 2026-12-06); with the crops of 20-100% of the image that
it used until 2026-12-06 (--config.input.crop_scale='(0.2,1.0)' as well) 79.46 / 80.64 /
80.10 / 80.73% (README "Does it learn?").
"""

from cmae_jax.config_defaults import fashion_mnist_config


def get_config():
    """Fashion-MNIST MAE config."""
    return fashion_mnist_config("mae")
