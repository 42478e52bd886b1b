r"""Every frozen-encoder protocol in one go: k-NN, linear probe, low-shot, clustering, pictures.

This is the command behind each row of the README's results table:
  python -m cmae_jax.main --config=configs/eval/all.py --config.init=INIT --workdir=DIR
with INIT one of pixels, random, workdirs/fmnist_mae, workdirs/fmnist_cmae,
workdirs/fmnist_maect. Fine-tuning is separate (configs/eval/finetune.py): it trains.

The train and test features are extracted once and shared. Results: DIR/eval_results.json
(knn_top1, linear_probe_top1, low_shot_{1,2,5}_shot_top1, low_shot_{1,10}pct_top1,
cluster_accuracy, nmi, seconds per part), TensorBoard scalars and pictures in DIR,
DIR/pictures/{attention,embedding}.png, and one `<metric>: NN.NN%` line each on stdout,
`k-NN top-1: NN.NN%` last.

Expected on 2 CPU cores: about 6 minutes per encoder (2 of feature extraction, then the
probe's 20 cached epochs, 15 logistic regressions, k-means and the k-NN).
"""

from cmae_jax.config_defaults import eval_config


def get_config():
    """All frozen-feature protocols."""
    return eval_config(("knn", "linear_probe", "low_shot", "clustering", "pictures"))
