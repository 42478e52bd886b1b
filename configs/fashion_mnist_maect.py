r"""MAE-CT on real Fashion-MNIST: MAE, then an NNCLR head, then contrastive tuning, on a CPU.

Commands:
  # All three stages (stage 1 is exactly configs/fashion_mnist_mae.py):
  python -m cmae_jax.main --config=configs/fashion_mnist_maect.py --workdir=workdirs/fmnist_maect
  # Stages 2 + 3 only, from an existing run of configs/fashion_mnist_mae.py:
  python -m cmae_jax.main --config=configs/fashion_mnist_maect.py --workdir=workdirs/fmnist_maect \
      --config.stages.head.init_from=workdirs/fmnist_mae

Hardware: 2 CPU cores. Measured on 2026-12-06, stages 2 + 3 from the MAE demo run of that
day (whole images, no RandomResizedCrop: 81.65%), pinned to one core while another job used
the other: `k-NN top-1: 81.65%` after stage 2 and `k-NN top-1: 82.49%` after stage 3 (raw
encoder 82.56%) in 17 min 55 s; with --config.seed=1, 82.07% -> 82.97%. The tuning gains
less over this stronger MAE (+0.84 / +0.90) than over the MAE with crops of 20-100% of the
image (+2.69 / +1.59 with seeds 0 / 1), and ends 0.34 / 0.74 points higher.
Measured on 2026-12-02 (stages 2 + 3 from the 5-epoch MAE demo run of that day, with the
crops and the per-example views, 80.09%, one core as above): `k-NN top-1: 80.09%` after
stage 2 (the encoder is frozen there, so this is the MAE encoder's own number) and, after
stage 3, `k-NN top-1: 82.31%` (the EMA encoder, published to later readers) with `k-NN
top-1 of the raw encoder: 82.25%`; stages 2 + 3 took 15 min 3 s on that one core (about
650 images/s in stage 3); expect about 9 minutes on 2 idle cores of the same machine (an
estimate: the CMAE demo step fed by its pipeline ran 1.7x faster on 2 idle cores than on
one; XLA's float32 matmul reached 416-452 GFLOP/s on the 2 cores). With 2 tuning epochs
instead of 6 the same start gave 81.20%. Stage 2 costs 1.7x and stage 3 3.1x the MAE
step's FLOPs per image (0.041 and 0.074 against 0.024 GFLOP). Each stage prints its result
as `k-NN top-1: NN.NN%` (cls token, k = 20, as the CMAE demo).

Departures from the ImageNet recipe (configs/maect_vitb.py), all for size and time:
  * the "Mu/7" encoder (96 wide, 4 deep, 3 heads), native 28 px views, patch 7 (a 4x4
    grid), as the MAE demo; stage 3 freezes the patch embedding, the cls token and blocks
    0-1 (the first half, as SPEC);
  * cls-token pooling (SPEC: mean for B) so that stage 2/3 train the feature the k-NN
    reads, and the MAE demo's k-NN (cls) is the "before" number;
  * heads 512 -> 128 (projector hidden, output) and 1024 (predictor hidden) instead of
    2048 / 4096 -> 256: the full heads would cost more than the encoder here;
  * a queue of 4,096 instead of 65,536: Fashion-MNIST has 60k images, and 65,536 would
    hold more than an epoch (ImageNet's queue holds 5% of an epoch, this one 7%);
  * global batch 256 instead of 1024, and 1 (head) + 6 (tuning) epochs instead of 20 + 20;
  * base lr 5e-4 for the heads and 2.5e-4 for the encoder instead of 1e-4 (still times
    batch * 2 views / 256): the schedules are a few hundred steps long (the MAE demo
    raises its lr for the same reason);
  * crops: scale 0.2-1.0 instead of 0.08-1.0 (an 8% crop of a 28 px image is 8 px) in
    stages 2 and 3; none in stage 1 (the MAE demo: whole images, flipped or not);
  * encoder EMA 0.995 instead of 0.9999 in stage 3: the official momentum averages over
    40% of ViT-B's 25,020 tuning steps, 0.995 over 200 of the 1,404 here.
"""

from cmae_jax.config_defaults import fashion_mnist_maect_config


def get_config():
    """Fashion-MNIST MAE-CT config (stage 1 = the Fashion-MNIST MAE demo)."""
    return fashion_mnist_maect_config()
