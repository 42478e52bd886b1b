"""Default CMAE/MAE config: every key the trainers read, with the SPEC's numbers.

The files in configs/ start from `base_config()` and override what differs, so a key
exists in every config and `--config.key=value` overrides work uniformly.
"""

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_config(method: str = "cmae") -> ml_collections.ConfigDict:
    """The CMAE ViT-B/16 ImageNet recipe of SPEC.md; method='mae' gives plain MAE."""
    config = ml_collections.ConfigDict()
    config.method = method  # 'cmae' or 'mae' (MAE = CMAE without the target branch).
    config.seed = 0

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "tfds"  # 'tfds' or 'fashion_mnist'
    config.dataset.tfds_name = "imagenet2012"
    config.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.dataset.idx_dir = "/usr/share/datasets/fashion-mnist"
    config.dataset.allow_tfds_download = False
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.num_classes = 1000

    config.input = ml_collections.ConfigDict()
    config.input.global_batch_size = 4096
    config.input.image_size = 224
    config.input.channels = 3
    config.input.patch_size = 16
    config.input.crop_scale = (0.2, 1.0)
    config.input.crop_ratio = (3 / 4, 4 / 3)
    # Pixel shifting: the master crop is image_size + shift; the target view is offset by
    # 0..shift pixels (SPEC: 256 px master, offsets 0..31).
    config.input.shift = 31
    config.input.flip = True
    config.input.target_view = method == "cmae"
    config.input.color_jitter = ml_collections.ConfigDict(
        dict(prob=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    )
    config.input.grayscale_prob = 0.2
    config.input.blur_prob = 0.5
    config.input.blur_sigma = (0.1, 2.0)
    config.input.mean = IMAGENET_MEAN
    config.input.std = IMAGENET_STD
    # CMAE's official masking: 2x2-patch cells, 35% of cells kept. MAE: random 0.75.
    config.input.mask_type = "block" if method == "cmae" else "random"
    config.input.mask_ratio = 0.65 if method == "cmae" else 0.75
    config.input.mask_block = 2
    config.input.shuffle = True
    # Evaluation views: resize the shorter side to image_size / fraction, centre crop.
    config.input.eval_crop_fraction = 0.875

    config.model = ml_collections.ConfigDict()
    config.model.variant = "B/16"
    # Optional overrides of the variant's encoder sizes (None: the variant's own).
    for key in ("width", "depth", "num_heads", "mlp_dim"):
        config.model[key] = ml_collections.FieldReference(None, field_type=int)
    config.model.pixel_decoder_width = 512
    config.model.pixel_decoder_depth = 8
    config.model.pixel_decoder_heads = 16
    config.model.feature_decoder_depth = 2
    config.model.projector_hidden = 1536
    config.model.projection_dim = 256
    config.model.dtype = "float32"  # 'bfloat16': bf16 compute, fp32 parameters.

    config.loss = ml_collections.ConfigDict()
    config.loss.norm_pix = True
    config.loss.contrastive_weight = 1.0 if method == "cmae" else 0.0
    config.loss.temperature = 0.07

    config.ema = ml_collections.ConfigDict()
    config.ema.momentum = 0.996
    config.ema.schedule = "constant"  # or 'cosine' (to 1.0 at the last step)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.base_lr = 1.5e-4  # peak lr = base_lr * global_batch / 256
    config.optimizer.min_lr = 0.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_epochs = 40.0
    config.optimizer.grad_clip_norm = 0.0  # 0 = off

    config.num_epochs = 1600
    config.total_steps = 0  # > 0 overrides num_epochs (handy for smoke runs)

    # Mesh over all devices: -1 takes what the other axes leave.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # [logical name, mesh axes] pairs; 'batch' defaults to ('data', 'fsdp').
    config.logical_axis_rules = [["batch", ["data", "fsdp"]]]

    config.log_every_steps = 100
    config.image_every_steps = 5000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3

    config.eval = ml_collections.ConfigDict()
    config.eval.knn = True
    config.eval.knn_k = 20
    config.eval.knn_temperature = 0.07
    config.eval.feature = "cls"  # 'cls' token or 'mean' of patch tokens (final norm)
    config.eval.batch_size = 1024
    config.eval.train_split = "train"  # the k-NN memory bank

    return config


FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def fashion_mnist_config(method: str = "cmae") -> ml_collections.ConfigDict:
    """The CPU-sized Fashion-MNIST demo shared by configs/fashion_mnist_{cmae,mae}.py."""
    config = base_config(method)
    config.dataset.name = "fashion_mnist"
    config.dataset.tfds_name = "fashion_mnist"
    config.dataset.train_split = "train"
    config.dataset.eval_split = "test"
    config.dataset.num_classes = 10

    config.input.global_batch_size = 256
    config.input.image_size = 32
    config.input.channels = 1
    config.input.patch_size = 4
    config.input.shift = 4
    config.input.mean = FASHION_MNIST_MEAN
    config.input.std = FASHION_MNIST_STD
    config.input.eval_crop_fraction = 1.0

    config.model.variant = "Mu/4"
    config.model.pixel_decoder_width = 64
    config.model.pixel_decoder_depth = 2
    config.model.pixel_decoder_heads = 4
    config.model.projector_hidden = 512
    config.model.projection_dim = 128

    config.optimizer.base_lr = 1e-3
    config.optimizer.warmup_epochs = 0.25
    config.num_epochs = 4

    config.log_every_steps = 20
    config.image_every_steps = 200
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2

    config.eval.batch_size = 1000
    config.eval.feature = "cls"
    return config
