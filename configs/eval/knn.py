r"""Weighted k-NN (cosine, k = 20, votes exp(s / 0.07)) of a frozen encoder, Fashion-MNIST.

Command:
  python -m cmae_jax.main --config=configs/eval/knn.py --config.init=workdirs/fmnist_cmae \
      --workdir=workdirs/eval_knn_cmae

init: any run of this project (workdir, checkpoints/ or step folder; MAE-CT workdir or
stage folder), 'random' or 'pixels'. The encoder and input geometry come from the run's
config.json. Change k / T with --config.eval.knn_k / --config.eval.knn_temperature, the
feature with --config.eval.feature=cls|mean|cls+mean|grid|tokens.

Expected on 2 CPU cores: about 2 minutes (features of 70k images, then the k-NN);
`k-NN top-1: 80.09%` for the 4-epoch CMAE demo (the number its own run printed), 85.66%
for 'pixels'.
"""

from cmae_jax.config_defaults import eval_config


def get_config():
    """k-NN evaluation config."""
    return eval_config(("knn",))
