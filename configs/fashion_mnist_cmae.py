r"""CMAE on real Fashion-MNIST with a CPU-sized ViT: the embedded default demo.

Command (after `pip install -r requirements.txt -e .` and Debian's dataset-fashion-mnist):
  python -m cmae_jax.main --config=configs/fashion_mnist_cmae.py --workdir=workdirs/fmnist_cmae

Hardware: 2 CPU cores are enough. Measured on 2026-12-06 at 16:27, a fresh clone on 2 idle
cores whose XLA float32 matmul reached 273-301 GFLOP/s (scale by your machine's rate:
`python benchmarks/train_step.py` prints it): 5 min 31 s in all, ending with the line
`k-NN top-1: 81.58%`, the first run with the batched views (the input pipeline's default
since that day: other random views from the same distribution); again at 19:49, 5 min 23 s
at 243-252 GFLOP/s, the same k-NN and losses; at 23:18 on a fresh machine whose CPU sums
in another order, 5 min 26 s at 156-204 GFLOP/s and 81.24% (the commit before gave the
same 59 losses there). With the per-example views (--config.input.batched_views=False) it
printed 81.22% (80.93% on some CPUs), and every run
since 2026-12-04 took 5 min 40 s to 8 min 41 s (machines at 167-290 GFLOP/s); a machine at
121-211 took 7 min 30 s to 21 min 10 s (docs/measurements.md lists each run).

Against the yardstick: k-NN on the raw pixels gives 85.69%, so this encoder is under them;
16 epochs (--config.num_epochs=16: 20 min 34 s at 227-230 GFLOP/s) gave 82.58% (82.61% on one
core) and 82.50% with seeds 0 and 1 (README "Does it learn?").

Departures from the ImageNet recipe, all for size and for a 5-epoch run:
  * native 28 px images in 7 px patches (a 4x4 grid of 16 tokens) and a 32 px master crop
    (28 + the 4 px target shift; the official rule's + 1 would add a row no view sees);
  * random masking of 75% (4 of 16 patches visible): a 4x4 grid has only four 2x2 cells,
    too few for CMAE's block masking;
  * a 96-wide, 4-deep encoder ("Mu/7"); decoders 64 wide, 2 deep; projector/predictor
    512 -> 128; batch 256 with a higher base lr and a short warmup;
  * contrastive weight 10 instead of 1: after 2 epochs, k-NN 80.86% against 80.07% at
    weight 3 and 79.01% at 1; after 5, 81.42% against 81.17% (the gain is mostly early;
    README "Does it learn?"); grey images get brightness/contrast jitter only.
"""

from cmae_jax.config_defaults import fashion_mnist_config


def get_config():
    """Fashion-MNIST CMAE config."""
    config = fashion_mnist_config("cmae")
    # The online view is MAE's: the whole image (no RandomResizedCrop, flip only) at the
    # evaluation's scale, in the top-left of the 32 px master with black below and to the
    # right ('pad'); the target view is it shifted by 0-4 px with a brightness change. With
    # the paper's contrastive weight 1 this gave k-NN 81.70 / 81.76 / 81.23 / 82.01% over
    # seeds 0-3, against 81.08 / 80.63 / 80.24 / 80.79% for the recipe it replaced (crops of
    # 20-100% filling the master, 'resize', weight 10): +0.99, every seed up. Each part alone
    # moved less or nothing (README "Does it learn?", the ablation of 2026-12-06/07).
    config.input.crop_scale = (1.0, 1.0)
    config.input.master_mode = "pad"
    config.loss.contrastive_weight = 1.0
    return config
