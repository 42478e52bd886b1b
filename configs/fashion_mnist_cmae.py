r"""CMAE on real Fashion-MNIST with a CPU-sized ViT: the embedded default demo.

Command (after `pip install -r requirements.txt -e .` and Debian's dataset-fashion-mnist):
  python -m cmae_jax.main --config=configs/fashion_mnist_cmae.py --workdir=workdirs/fmnist_cmae

Hardware: 2 CPU cores are enough. Measured on 2026-12-07 at 07:55, a fresh clone on 2 idle
cores whose XLA float32 matmul reached 202-214 GFLOP/s (scale by your machine's rate:
`python benchmarks/train_step.py` prints it): 7 min 29 s in all, ending with the line
`k-NN top-1: 82.05%` (again at 10:28, a later clone: 7 min 30 s at 193-216 GFLOP/s, the
same 59 losses). Over seeds 0-3 (--config.seed=N, one core
each) 81.99 / 82.41 / 82.35 / 82.45%. Without the conv stem (--config.model.stem_channels=0,
the default from 02:10 to 06:00 that day) 81.63% in 5 min 30 s at 179-209 GFLOP/s, and
81.70 / 81.76 / 81.23 / 82.01% over seeds 0-3; before 02:10 the demo cropped 20-100% of
each image into its master ('resize') at contrastive weight 10 (81.58%): add
--config.model.stem_channels=0 --config.input.crop_scale='(0.2,1.0)'
--config.input.master_mode=resize --config.loss.contrastive_weight=10.0 to repeat it.

Against the yardstick: k-NN on the raw pixels gives 85.69%, so this encoder is under them,
and above the MAE demo (configs/fashion_mnist_mae.py, the same view: 81.43-82.07% over
seeds 0-3) in every seed, by 0.61 on average (README "Fashion-MNIST results").

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
    512 -> 128; batch 256 with a higher base lr and a short warmup; grey images get
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
