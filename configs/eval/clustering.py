r"""Clustering: k-means (k = 10 classes) on frozen features; cluster accuracy and NMI.

Command:
  python -m cmae_jax.main --config=configs/eval/clustering.py \
      --config.init=workdirs/fmnist_cmae --workdir=workdirs/eval_cluster_cmae

k-means++ seeding, 3 restarts, 100 Lloyd iterations on the L2-normalised features of the
test split (config.clustering.split); cluster accuracy under the Hungarian matching of
clusters to classes, NMI with arithmetic normalisation.

Expected on 2 CPU cores: about 2 minutes (mostly feature extraction). Measured on
Fashion-MNIST: raw pixels 51.85% cluster accuracy / NMI 0.546, the CMAE demo 53.33% / 0.571.
"""

from cmae_jax.config_defaults import eval_config


def get_config():
    """Clustering evaluation config."""
    return eval_config(("clustering",))
