r"""CMAE ViT-L/16 on ImageNet-1k: the CMAE recipe at ViT-L size.

Command:
  python -m cmae_jax.main --config=configs/cmae_vitl.py --workdir=gs://BUCKET/cmae_vitl \
      --config.dataset.data_dir=DATA_DIR

Hardware: global batch 4096, e.g. TPU v4-128 / v5p-128 or 64+ A100-80GB; bf16 compute
(the default on TPUs and GPUs) and FSDP over all devices (the ViT-L default).
Expected: the CMAE papers publish no ViT-L number in our SPEC; the MAE baseline of the same
size fine-tunes to 85.9% (linear probe 75.8%) after 1600 epochs, and MAE ViT-L needs about
42 h for 800 epochs on 64 V100s. CMAE should land at or above MAE; unmeasured here.
The feature decoder projects to 1024 (the encoder width), not the official 768 (ViT-B's).
"""

from cmae_jax.config_defaults import base_config, set_variant


def get_config():
    """The CMAE ViT-L/16 ImageNet config."""
    config = base_config("cmae")
    set_variant(config, "L/16")
    config.num_epochs = 1600
    return config
