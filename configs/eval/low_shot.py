r"""Low-shot: logistic regression on 1, 2, 5 images per class and on 1% / 10% of the labels.

Command:
  python -m cmae_jax.main --config=configs/eval/low_shot.py \
      --config.init=workdirs/fmnist_cmae --workdir=workdirs/eval_lowshot_cmae

Subsets are drawn per class from a seed (config.low_shot.seeds = 0, 1, 2; accuracy
averaged); multinomial logistic regression with an L2 penalty (config.low_shot.l2) on
L2-normalised frozen features, fitted by L-BFGS; tested on the whole test split.

Expected on 2 CPU cores: about 3 minutes (2 of them feature extraction). 1-shot accuracies
on Fashion-MNIST are far below the k-NN (one image per class); 10% approaches the probe.
"""

from cmae_jax.config_defaults import eval_config


def get_config():
    """Low-shot evaluation config."""
    return eval_config(("low_shot",))
