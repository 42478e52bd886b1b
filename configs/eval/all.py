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

Measured on 2 CPU cores: 1 min 40 s for 'pixels', 3 to 4.5 minutes for the demo encoders
(feature extraction of 70k images dominates; then the probe's cached epochs, 15 logistic
regressions, k-means and the k-NN). The README's results table lists every number; e.g.
the CMAE demo: k-NN 80.09%, linear probe 81.73%, 1-shot 49.26%, cluster accuracy 53.33%.
"""

from cmae_jax.config_defaults import eval_config


def get_config():
    """All frozen-feature protocols."""
    return eval_config(("knn", "linear_probe", "low_shot", "clustering", "pictures"))
