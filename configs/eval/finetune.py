r"""End-to-end fine-tuning of a pretrained encoder on Fashion-MNIST (SPEC's recipe, shortened).

Command:
  python -m cmae_jax.main --config=configs/eval/finetune.py \
      --config.init=workdirs/fmnist_cmae --workdir=workdirs/eval_finetune_cmae

AdamW (0.9, 0.999), base lr 5e-4 x batch / 256, weight decay 0.05, layer decay 0.65,
drop path 0.1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, RandAugment m9 mstd0.5,
random erasing 0.25, global average pooling + fc_norm; 10 epochs with 1 warmup epoch
(SPEC: 100 / 5 on ImageNet). Resumable: checkpoints in WORKDIR/finetune.
--config.init=random trains the same ViT from scratch (the supervised baseline).

Expected on 2 CPU cores: roughly 12 minutes per epoch for the demo encoder (an estimate
from the pretraining speed; 2,340 steps in all). Not measured to the end here: the
README's results table leaves fine-tuning out for its cost on a CPU.
"""

from cmae_jax.config_defaults import eval_config


def get_config():
    """Fine-tuning evaluation config."""
    return eval_config(("finetune",))
