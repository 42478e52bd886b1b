r"""Linear probe (BatchNorm without affine + Linear, LARS) on a frozen encoder, Fashion-MNIST.

Command:
  python -m cmae_jax.main --config=configs/eval/linear_probe.py \
      --config.init=workdirs/fmnist_cmae --workdir=workdirs/eval_probe_cmae

Default: cached eval-view features (extracted once), 20 epochs of SGD (momentum 0.9) at lr
0.1 with 2 warmup epochs. SPEC/MAE use LARS (--config.linear_probe.optimizer=lars) at
lr 6.4 (batch 16384) for 90 epochs on ImageNet; LARS's steps (0.001 x lr of each weight's
norm) are too small at batch 256 unless base_lr is raised accordingly. With
--config.linear_probe.augment=True it trains on RandomResizedCrop (0.08-1) + flip views,
running the frozen encoder in every step (SPEC's recipe; about 10x slower here).
--config.linear_probe.feature=cls|mean|cls+mean|grid|tokens, --config.linear_probe.optimizer=sgd.

Expected on 2 CPU cores: about 3 minutes cached (2 of them feature extraction). Measured:
the CMAE demo 81.73% (its k-NN: 80.09%), MAE 79.75%, raw pixels 84.15%.
"""

from cmae_jax.config_defaults import eval_config


def get_config():
    """Linear-probe evaluation config."""
    return eval_config(("linear_probe",))
