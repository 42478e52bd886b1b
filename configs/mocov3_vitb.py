r"""MoCo v3 ViT-B/16 on ImageNet-1k: the instance-discrimination baseline (SPEC.md, "MoCo v3").

Command (TPU VM or GPU host, ImageNet prepared for TFDS under DATA_DIR):
  python -m cmae_jax.main --config=configs/mocov3_vitb.py --workdir=gs://BUCKET/mocov3_vitb \
      --config.dataset.data_dir=DATA_DIR

Hardware: written for global batch 4096, e.g. a TPU v4-64 / v5e-64 slice or 64 A100s
(the official run used 64 V100s). Each step passes two whole 224 px views through the
online encoder (forward and backward) and the momentum encoder (forward): about 280
GFLOPs per image (methods.mocov3.flops_per_example), 2.5x CMAE's 112 and 4.8x MAE's 58
(cmae_jax.aot's count), so an epoch costs about what 2.5 CMAE epochs do. Expected
(official CONFIG.md, ViT-B, 300 epochs): 76.7% top-1 linear probe; the k-NN this run
prints at the end is ours (k = 20). We have not run this config at full scale.

Recipe (the official command: --optimizer=adamw --lr=1.5e-4 --weight-decay=.1
--epochs=300 --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2): two views
with BYOL's augmentations (RandomResizedCrop 0.08-1.0 + flip, colour jitter 0.4/0.4/0.2/0.1
p 0.8, grayscale p 0.2, blur p 1.0 / 0.1, solarize p 0.0 / 0.2); symmetric InfoNCE, tau
0.2, scaled by 2 tau, keys of the global batch; momentum encoder and projector, momentum
0.99 rising to 1 on a half cosine; projector 3 layers (4096 hidden, 256 out) and
predictor 2 layers (4096 hidden), no biases, BatchNorm after every layer (the last without
affine); cls-token representation; frozen random patch projection; AdamW (0.9, 0.999),
lr 1.5e-4 * 4096 / 256, weight decay 0.1 on every parameter, 40 warmup epochs then
cosine. The departures (encoder initialisation details) are listed in
cmae_jax/methods/mocov3.py (its `set_defaults` holds the recipe).
"""

from cmae_jax.config_defaults import base_config, set_variant


def get_config():
    """The MoCo v3 ViT-B/16 ImageNet config."""
    config = base_config("mocov3")
    set_variant(config, "B/16")
    return config
