r"""MAE ViT-L/16 on ImageNet-1k: the official recipe (SPEC.md, section MAE).

Command (TPU VM or GPU host, ImageNet prepared for TFDS under DATA_DIR):
  python -m cmae_jax.main --config=configs/mae_vitl.py --workdir=gs://BUCKET/mae_vitl \
      --config.dataset.data_dir=DATA_DIR

Hardware: written for global batch 4096 on TPU v4-128 / v5p-128 (MAE ViT-L: about 42 h for
800 epochs on 64 V100). Expected (official MAE, 1600 epochs): 85.9% top-1 after fine-
tuning, 75.8% linear probe (cls token). We have not run this config at full scale.

Recipe: random masking 0.75, per-patch normalised pixel loss on the masked patches, pixel
decoder 512 wide x 8 deep, AdamW (0.9, 0.95) wd 0.05, lr 1.5e-4 * 4096 / 256, 40 warmup
epochs then cosine, RandomResizedCrop(224, 0.2-1.0, bicubic) + flip, 1600 epochs (800 is
the other published length: --config.num_epochs=800).
"""

from cmae_jax.config_defaults import base_config, set_variant


def get_config():
    """The MAE ViT-L/16 ImageNet config."""
    config = base_config("mae")
    set_variant(config, "L/16")
    config.num_epochs = 1600
    return config
