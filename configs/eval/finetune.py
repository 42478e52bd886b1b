r"""End-to-end fine-tuning of a pretrained encoder on Fashion-MNIST (SPEC's recipe, shortened).

Command:
  python -m cmae_jax.main --config=configs/eval/finetune.py \
      --config.init=workdirs/fmnist_cmae --workdir=workdirs/eval_finetune_cmae

AdamW (0.9, 0.999), base lr 5e-4 x batch / 256, weight decay 0.05, layer decay 0.65,
drop path 0.1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, RandAugment m9 mstd0.5,
random erasing 0.25, global average pooling + fc_norm; 10 epochs with 1 warmup epoch
(SPEC: 100 / 5 on ImageNet). Resumable: checkpoints in WORKDIR/finetune.
--config.init=random trains the same ViT from scratch, but this recipe is made for
pretrained encoders: configs/fashion_mnist_supervised.py is the one for a random encoder.

Measured for the demo encoder on one CPU core (2026-12-03, another job on the other):
from random weights, 5 epochs without RandAugment, mixup, cutmix and random erasing took
15 min 26 s and reached 76.65%. Not measured with the whole recipe, nor from a pretrained
encoder: the README's results table leaves fine-tuning out for its cost on a CPU.
"""

from cmae_jax.config_defaults import eval_config


def get_config():
    """Fine-tuning evaluation config."""
    return eval_config(("finetune",))
