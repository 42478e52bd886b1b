r"""CMAE on real Fashion-MNIST with a CPU-sized ViT: the embedded default demo.

Command (after `pip install -r requirements.txt -e .` and Debian's dataset-fashion-mnist):
  python -m cmae_jax.main --config=configs/fashion_mnist_cmae.py --workdir=workdirs/fmnist_cmae

Hardware: 2 CPU cores are enough. Measured on 2026-12-08 at 01:34, a fresh clone on 2
idle cores whose XLA float32 matmul reached 169-201 GFLOP/s (scale by your machine's rate:
`python benchmarks/train_step.py` prints it): 7 min 41 s in all, ending with the line
`k-NN top-1: 82.68%` (82.79% the day before, before the faster step's other float
roundings). Over seeds 0-3 (--config.seed=N, one core each) 82.98 / 83.60 /
83.61 / 83.77%. Until 2026-12-07 22:00 the lr decayed by a cosine after the warmup
(--config.optimizer.schedule=cosine repeats it): 82.05% in 7 min 29 s at 202-214 GFLOP/s,
81.99 / 82.41 / 82.35 / 82.45% over seeds 0-3; the recipes before that are in
docs/measurements.md and the README's "Does it learn?".

Against the yardstick: k-NN on the raw pixels gives 85.69%, so this encoder is under them,
and above the MAE demo (configs/fashion_mnist_mae.py, the same view: 82.08-82.70% over
seeds 0-3) in every seed, by 1.07 on average. The same command with
--config.num_epochs=14 passes the pixels with seed 0 only: 85.78% in 19 min 32 s on 2 idle
cores (195-201 GFLOP/s), over the quickstart's 15 minutes; seeds 1 / 2 gave 85.50 / 85.46%.

Departures from the ImageNet recipe, all for size and for a 5-epoch run:
  * native 28 px images in 7 px patches (a 4x4 grid of 16 tokens) and a 32 px master
    (28 + the 4 px target shift; the official rule's + 1 would add a row no view sees);
  * the whole image, no RandomResizedCrop, resized to the 28 px view in the master's
    top-left corner with black below and to the right (master_mode 'pad'), instead of the
    official crop filling the master: the online view is the evaluation's view, the target
    it shifted by 0-4 px;
  * random masking of 75% (4 of 16 patches visible): a 4x4 grid has only four 2x2 cells,
    too few for CMAE's block masking;
  * a 96-wide, 4-deep encoder ("Mu/7"); decoders 64 wide, 2 deep; projector/predictor
    512 -> 128; batch 256 with a higher base lr, a short warmup and then the peak lr held
    to the end (no cosine decay: +1.19 k-NN over seeds 0-3); grey images get
    brightness/contrast jitter only. The contrastive weight is the paper's 1 (10 with the
    crops until 2026-12-07, where it started faster: README "Does it learn?");
  * two patch-local 3x3 conv layers of 16 channels before the patch embedding (+0.63 k-NN
    over seeds 0-3); HF ViTMAE and timm have no place for them, so this encoder does not
    export (--config.model.stem_channels=0 trains one that does).
"""

from cmae_jax.config_defaults import fashion_mnist_config


def get_config():
    """Fashion-MNIST CMAE config (its departures: config_defaults.fashion_mnist_config)."""
    return fashion_mnist_config("cmae")
