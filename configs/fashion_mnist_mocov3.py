r"""MoCo v3 on real Fashion-MNIST with a CPU-sized ViT: the baseline beside the CMAE demo.

Command (after `pip install -r requirements.txt -e .` and Debian's dataset-fashion-mnist):
  python -m cmae_jax.main --config=configs/fashion_mnist_mocov3.py \
      --workdir=workdirs/fmnist_mocov3

Hardware: 2 CPU cores. Each step runs two 28 px views through the online encoder (forward
and backward) and the momentum encoder, all 17 tokens: 0.132 GFLOP per image against the
CMAE demo's 0.053 (flops_per_example). Measured pinned to one core while another job used
the other: 13 min 32 s on 2026-12-02 (XLA float32 2048^3 matmul 236 GFLOP/s on that core),
ending with `k-NN top-1: 82.87%` (cls token, k = 20, as the CMAE demo); 23 min 45 s and
82.82% on 2026-12-04 on a slower machine (147-205 GFLOP/s on both cores). README "Does it
learn?" has the rest of its row.

Departures from the ImageNet recipe (configs/mocov3_vitb.py), all for size and time:
  * the "Mu/7" encoder (96 wide, 4 deep, 3 heads), native 28 px views, patch 7 (a 4x4
    grid), as the CMAE demo;
  * heads 512 -> 128 (projector hidden and output) and 512 (predictor hidden) instead of
    4096 -> 256, as the CMAE demo's heads;
  * global batch 256 instead of 4096, 4 epochs instead of 300, base lr 5e-4 (times
    batch / 256) instead of 1.5e-4 and half an epoch of warmup instead of 40: a schedule
    of under a thousand steps (the CMAE and MAE-CT demos raise theirs for the same reason);
  * views: crops of scale 0.2-1.0 instead of 0.08-1.0 (an 8% crop of a 28 px image is
    8 px; the MAE-CT demo's choice) and, on grey images, brightness and contrast jitter
    only (p 0.8): no saturation, hue or grayscale (identities on one channel), no blur or
    solarize (at 28 px a 3-pixel blur kernel and a grey-level flip would mostly destroy
    the garment's texture).
"""

from cmae_jax.config_defaults import fashion_mnist_config, keep_grey_view_ops


def get_config():
    """Fashion-MNIST MoCo v3 config."""
    config = fashion_mnist_config("mocov3")
    config.mocov3.projector_hidden = 512
    config.mocov3.predictor_hidden = 512
    config.mocov3.projection_dim = 128
    config.input.crop_scale = (0.2, 1.0)
    keep_grey_view_ops(config.input.view_augment)
    config.optimizer.base_lr = 5e-4
    config.optimizer.warmup_epochs = 0.5
    config.num_epochs = 4
    return config
