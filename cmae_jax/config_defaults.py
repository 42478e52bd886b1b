"""Default configs: every key the trainers read, with the SPEC's numbers.

The files in configs/ start from `base_config()` and override what differs, so a key
exists in every config and `--config.key=value` overrides work uniformly.
"""

import ml_collections

from cmae_jax import methods
from cmae_jax.models import vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_config(method: str = "cmae") -> ml_collections.ConfigDict:
    """The ViT-B/16 ImageNet recipe of SPEC.md for a registered method (cmae_jax.methods):
    the shared keys here, then the method's own defaults (its module's `defaults`)."""
    config = ml_collections.ConfigDict()
    config.method = method  # a name of cmae_jax.methods.REGISTRY, e.g. 'cmae' or 'mae'.
    config.seed = 0
    # Start pretraining from a checkpoint instead of random weights (a fresh optimiser): a
    # run of this project or a published one (a .pth / .bin / .safetensors file or an HF
    # folder of MAE, timm, HF ViTMAE, CMAE or MAE-CT; see README "Published checkpoints").
    # The encoder must match config.model; decoders and heads load where the file has
    # matching ones. '' = random initialisation.
    config.init_from = ""

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "tfds"  # 'tfds', 'imagefolder' or 'fashion_mnist'
    config.dataset.tfds_name = "imagenet2012"
    config.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.dataset.idx_dir = "/usr/share/datasets/fashion-mnist"
    # name='imagefolder': FOLDER/<split>/<class>/<image>.jpg|.jpeg|.png (local or gs://);
    # train_split / eval_split name the split sub-folders (e.g. 'train', 'val').
    config.dataset.folder = ml_collections.FieldReference(None, field_type=str)
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
    # Pixel shifting: the target view is offset by 0..shift pixels within the master crop
    # (SPEC: offsets 0..31 within a 256 px master). master_size 0 = image_size + shift + 1
    # as the official code (RandomResizedCrop to 256, offsets randint(0, 31), so its last
    # row and column are in no view); plain MAE resizes straight to image_size.
    config.input.shift = 31
    config.input.master_size = 0
    # 'resize' (the official) or 'pad' (methods.cmae.MASTER_MODES): the crop resized to the
    # whole master, or to image_size with black below and to the right of it.
    config.input.master_mode = "resize"
    config.input.flip = True
    config.input.target_view = False  # the method's defaults decide (CMAE: True)
    config.input.color_jitter = ml_collections.ConfigDict(
        dict(prob=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    )
    config.input.grayscale_prob = 0.2
    config.input.blur_prob = 0.5
    config.input.blur_sigma = (0.1, 2.0)
    # Random erasing of the target view (torchvision RandomErasing, filled with the mean):
    # not in the CMAE recipe (probability 0); a lever of the small-data study.
    config.input.erase_prob = 0.0
    config.input.erase_scale = (0.02, 0.33)
    config.input.erase_ratio = (0.3, 3.3)
    config.input.mean = IMAGENET_MEAN
    config.input.std = IMAGENET_STD
    # Set by the method's defaults: CMAE's official masking, 2x2-patch cells, 35% of the
    # cells kept; MAE: random 0.75.
    config.input.mask_type = "random"
    config.input.mask_ratio = 0.75
    config.input.mask_block = 2
    config.input.shuffle = True
    # Evaluation views: resize the shorter side to image_size / fraction, centre crop.
    config.input.eval_crop_fraction = 0.875
    # tf.data: files read and decoded at once (0: 4 per core, at least 16) and the size of
    # the pipeline's private thread pool (0: the cores this process may use).
    config.input.parallel_reads = 0
    # Views a batch at a time where the source's images share one shape in memory
    # (Fashion-MNIST, small TFDS splits): the same draw functions and view ops, drawn per
    # global batch instead of per example, for a tenth of the input pipeline's CPU time
    # (cmae_jax.data.pipeline). False: every view per example, from the example's seed.
    config.input.batched_views = True
    config.input.threadpool_size = 0

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
    # CMAE: what the contrastive branch pools its patch tokens into before the projector:
    # 'mean' (the paper's), 'grid' (means over 2 x 2 cells, concatenated) or 'cells' (each
    # cell's mean contrasted on its own); levers of the small-data study (README "Does it
    # learn?"), models.cmae.CONTRASTIVE_POOLINGS.
    config.model.contrastive_pooling = "mean"
    # Compute dtype; parameters and optimiser state are float32 whatever it is. 'auto':
    # bfloat16 on GPU and TPU, float32 on CPU (models.cmae.resolve_dtype).
    config.model.dtype = "auto"
    # Memory levers. remat: 'none', 'full' (keep each block's input, recompute the rest in
    # the backward pass) or 'save_dots' (keep the linear layers' outputs, recompute
    # attention scores, norms, GELU). scan_layers: nn.scan over the blocks (parameters
    # stacked along a 'layers' axis; compile time independent of depth).
    config.model.remat = "none"
    config.model.scan_layers = False
    # Patch embedding: 0 is ViT's linear map of each patch (the papers'); > 0 puts two
    # 3x3 conv layers of that many channels before it, each patch convolved alone so
    # masking stays exact (models.vit.conv_stem). On only in the CMAE Fashion-MNIST demo
    # (fashion_mnist_config('cmae')): with whole-image views, 16 channels lifted CMAE's
    # k-NN by 0.63 over seeds 0-3 and lowered MAE's by 0.17 / 0.38 (README "Does it
    # learn?"). Published checkpoints have none; export refuses one.
    config.model.stem_channels = 0

    config.loss = ml_collections.ConfigDict()
    config.loss.norm_pix = True
    config.loss.contrastive_weight = 0.0  # the method's defaults decide (CMAE: 1.0)
    config.loss.temperature = 0.07

    config.ema = ml_collections.ConfigDict()
    config.ema.momentum = 0.996
    config.ema.schedule = "constant"  # or 'cosine' (to 1.0 at the last step)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.base_lr = 1.5e-4  # peak lr = base_lr * global_batch / 256
    config.optimizer.min_lr = 0.0
    config.optimizer.schedule = "cosine"  # after the warmup; or 'constant' (the peak held)
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.weight_decay = 0.05
    config.optimizer.warmup_epochs = 40.0
    config.optimizer.grad_clip_norm = 0.0  # 0 = off

    config.num_epochs = 1600
    config.total_steps = 0  # > 0 overrides num_epochs (handy for smoke runs)

    # Mesh over all devices: -1 takes what the other axes leave.
    # FSDP: e.g. data=1, fsdp=-1; tensor parallelism: tensor=2..8 (divides the heads).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Overrides of cmae_jax.sharding.DEFAULT_RULES: (logical name, mesh axes) pairs; a name
    # listed here replaces its default, the others keep theirs. A tuple, so that it can be
    # set on the command line, e.g. keeping every weight whole on each device:
    #   --config.logical_axis_rules='(("embed", None), ("proj", None))'
    config.logical_axis_rules = ()
    # Each optimiser step's global batch is split into this many micro-batches, run one
    # after another with gradients averaged: the memory of one micro-batch, the update of
    # the whole batch. InfoNCE negatives and BatchNorm statistics are per micro-batch.
    config.grad_accumulation_steps = 1

    # Non-finite guard (cmae_jax.loop): a step whose loss or gradient norm is NaN/inf leaves
    # the state unchanged and is counted (scalar skipped_updates). After
    # max_consecutive_skips such steps in a row the run goes back to the last checkpoint
    # with a finite loss and continues with the batches after the bad ones; after
    # max_rollbacks rollbacks it stops with a message. For an 800-epoch run with a
    # checkpoint every 1000 steps: isolated bad batches are skipped, a divergence costs at
    # most 1000 steps per rollback, and 3 rollbacks that do not help mean the recipe (lr,
    # precision) needs a person.
    config.guard = ml_collections.ConfigDict(
        dict(
            max_consecutive_skips=20,
            max_rollbacks=3,
            # Testing hook: batches (1-based positions in the data stream) whose float
            # inputs are replaced by NaN, to exercise the guard end to end.
            poison_batches=(),
        )
    )

    # JAX's persistent compilation cache (cmae_jax.compilation_cache): a rerun or a resumed
    # run loads its compiled init and step from this folder instead of compiling them
    # again. '' turns it off; a gs:// folder can serve every host of a pod. Left at this
    # default, the environment's JAX_COMPILATION_CACHE_DIR (when set) picks the folder.
    config.compilation_cache_dir = "~/.cache/cmae_jax/jax_compilation_cache"

    config.log_every_steps = 100
    # orbax's INFO lines (about 40 per checkpoint) on the terminal (cmae_jax.terminal);
    # --verbosity=1 shows them too.
    config.log_orbax_info = False
    # > 0: trace this many steps (after 10 warm-up steps) into WORKDIR/profile/process_<i>
    # on every process (TensorBoard's profile tab).
    config.profile_steps = 0
    config.image_every_steps = 5000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3

    config.eval = ml_collections.ConfigDict()
    config.eval.knn = True
    config.eval.knn_k = 20
    config.eval.knn_temperature = 0.07
    # What the k-NN, low-shot and clustering read (vit.POOLINGS, after the final norm): the
    # 'cls' token, the 'mean' of the patch tokens, 'cls+mean', the 'grid' of 2x2 cells'
    # token means, or every patch token flattened ('tokens': K x width numbers per image).
    config.eval.feature = "cls"
    config.eval.batch_size = 1024
    config.eval.train_split = "train"  # the k-NN memory bank
    # During pretraining: every this many steps (0: never) a k-NN of the encoder on
    # knn_subset evenly strided examples of the train split (bank) and of the eval split
    # (queries), 0 = the whole splits; logged as knn_top1_subset.
    config.eval.every_steps = 0
    config.eval.knn_subset = 10000
    # What runs every eval.every_steps: names of cmae_jax.evaluation.protocols.REGISTRY
    # that need no pictures or training of their own ('knn', 'low_shot', 'clustering').
    config.eval.periodic_protocols = ("knn",)
    config.eval.knn_chunk_size = 1024  # queries per k-NN step (device memory ~ chunk x bank)

    # The evaluations and pictures of a training run, as hooks of the loop
    # (cmae_jax.evaluation.hooks, which lists the types): name -> dict(type, every_steps,
    # at_stop, at_end, ...), big_vision style. The defaults follow the keys above (set
    # config.eval.every_steps, eval.knn, image_every_steps as before, or these directly).
    config.evals = ml_collections.ConfigDict()
    config.evals.periodic = dict(
        type="periodic",
        every_steps=config.eval.get_ref("every_steps"),
        protocols=config.eval.get_ref("periodic_protocols"),
        subset=config.eval.get_ref("knn_subset"),
    )
    config.evals.knn = dict(type="knn", at_end=config.eval.get_ref("knn"))
    config.evals.reconstructions = dict(
        type="reconstructions", every_steps=config.get_ref("image_every_steps"), at_stop=True
    )

    methods.get(method).defaults(config)
    return config


# Per-size meshes. ViT-B's train state (float32 parameters, two Adam moments, the EMA
# target: about 1.7 GB for CMAE) fits on every chip beside its activations, so B and
# smaller run data-parallel (the base config's mesh). ViT-L's (about 5 GB) and ViT-H's
# (about 11 GB) would crowd a 16 GiB TPU v5e chip, so they shard it over all devices (FSDP).
FSDP_SIZES = ("L", "H")


def set_variant(config: ml_collections.ConfigDict, variant: str) -> None:
    """Sets config.model.variant (and input.patch_size) and the mesh default for its size."""
    config.model.variant = variant
    size, patch = variant.split("/")
    config.input.patch_size = int(patch)
    if size in FSDP_SIZES:
        config.mesh.data, config.mesh.fsdp = 1, -1


# BYOL's two views as the official MoCo v3 main_moco.py and MAE-CT's "_aug" configs:
# RandomResizedCrop + flip, colour jitter p 0.8, grayscale p 0.2, blur p 1.0 / 0.1, solarize
# p 0.0 / 0.2 (view 1 / view 2).
BYOL_VIEW_AUGMENT = dict(
    color_jitter=dict(prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1),
    grayscale_prob=0.2,
    blur_prob=(1.0, 0.1),
    blur_sigma=(0.1, 2.0),
    solarize_prob=(0.0, 0.2),
)


def keep_grey_view_ops(view_augment: ml_collections.ConfigDict) -> None:
    """Reduces BYOL's two-view colour ops to brightness and contrast jitter (p 0.8) for 28 px
    grey images. Saturation, hue and grayscale are identities on one channel; solarize (a
    grey-level flip) is off, and so is blur (a 3-pixel kernel at 28 px): with BYOL's blur
    (p 1.0 / 0.1) in MAE-CT's "_aug" views stage 3 gave 82.98% against 83.13% without
    (README "Does it learn?")."""
    view_augment.color_jitter.saturation = 0.0
    view_augment.color_jitter.hue = 0.0
    view_augment.grayscale_prob = 0.0
    view_augment.blur_prob = (0.0, 0.0)
    view_augment.solarize_prob = (0.0, 0.0)


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
    # Native 28 px images in 7 px patches (a 4x4 grid of 16 tokens). Measured against the
    # earlier 32 px views in 4 px patches (an 8x8 grid): a 7.8x cheaper CMAE step and a
    # better k-NN after 5 epochs (CMAE 81.17% against 80.15% after 4, MAE 80.10% against
    # 78.70%; README "Does it learn?").
    config.input.image_size = 28
    config.input.channels = 1
    config.input.shift = 4
    # 28 + 4: the smallest master that holds a view shifted by up to 4 px (the official
    # rule's 28 + 4 + 1 would add a row and column no view ever sees).
    config.input.master_size = 32
    # A 4x4 grid has only four 2x2 cells, so CMAE's block masking would keep 1 or 2 of
    # them; both methods mask 75% of the patches at random (4 of 16 stay visible).
    config.input.mask_type = "random"
    config.input.mask_ratio = 0.75
    config.input.mean = FASHION_MNIST_MEAN
    config.input.std = FASHION_MNIST_STD
    config.input.eval_crop_fraction = 1.0

    set_variant(config, "Mu/7")
    config.model.pixel_decoder_width = 64
    config.model.pixel_decoder_depth = 2
    config.model.pixel_decoder_heads = 4
    config.model.projector_hidden = 512
    config.model.projection_dim = 128

    config.optimizer.base_lr = 1e-3
    config.optimizer.warmup_epochs = 0.25
    config.num_epochs = 5

    config.log_every_steps = 20
    config.image_every_steps = 200
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2

    config.eval.batch_size = 1000
    config.eval.feature = "cls"
    if method in ("mae", "cmae"):
        # MAE sees the whole image, no RandomResizedCrop (flip only): the evaluation's view.
        # Over seeds 0-3 of the 5-epoch demo, k-NN 81.65 / 82.07 / 81.43 / 81.63% against
        # 79.46 / 80.64 / 80.10 / 80.73% with crops of 20-100% (README "Does it learn?").
        # MoCo v3's two views are its crops. The whole area leaves no room for another
        # aspect ratio, so crop_ratio keeps its (3/4, 4/3): the sections that copy
        # config.input and set their own crop_scale (MAE-CT's stages 2 and 3, fine-tuning)
        # crop with the usual ratios.
        config.input.crop_scale = (1.0, 1.0)
        # The peak lr held after the warmup, no cosine decay: at these budgets the decay
        # costs k-NN. Held against cosine: 5 epochs CMAE +1.19, MAE +0.73 (means of seeds
        # 0-3, every seed up); seed 0 at 10 epochs CMAE +1.17, MAE +0.94, at 20 CMAE +0.95,
        # MAE +0.07 (README "The lr held at its peak"). A run's first N epochs are then the
        # N-epoch run.
        config.optimizer.schedule = "constant"
    if method == "cmae":
        # CMAE's online view is MAE's, in the top-left of the 32 px master with black below
        # and to the right ('pad'); the target view is it shifted by 0-4 px with a
        # brightness change. With the paper's contrastive weight 1 this gave k-NN 81.70 /
        # 81.76 / 81.23 / 82.01% over seeds 0-3, against 81.08 / 80.63 / 80.24 / 80.79% for
        # the recipe it replaced (crops of 20-100% filling the master, 'resize', weight 10):
        # +0.99, every seed up. Each part alone moved less or nothing (whole images alone
        # -0.61 / -0.04 over seeds 0 / 1; docs/representation_study.md, the ablation of
        # 2026-12-06/07).
        config.input.master_mode = "pad"
        config.loss.contrastive_weight = 1.0
        # Two 3x3 conv layers of 16 channels before the patch embedding, each patch
        # convolved alone (models.vit.conv_stem). On this view (with the cosine lr of that
        # day): k-NN 81.99 / 82.41 / 82.35 / 82.45% over seeds 0-3, +0.29 to +1.12 over the
        # same recipe without it and +0.34 to +0.92 over the MAE demo, every seed; the MAE
        # demo lost 0.17 / 0.38 with it. HF ViTMAE and timm have no such layer, so this
        # encoder cannot be exported; --config.model.stem_channels=0 trains one that can.
        config.model.stem_channels = 16
    return config


def eval_config(protocols: tuple[str, ...] = ("knn",)) -> ml_collections.ConfigDict:
    """Evaluation of a pretrained (or random, or no) encoder: method 'eval' (cmae_jax.evaluate).

    Defaults: Fashion-MNIST and the demo encoder; with config.model_from_init the encoder
    and the input geometry come from the evaluated run's own config.json.
    """
    config = fashion_mnist_config("mae")
    config.method = "eval"
    # An evaluation never reads config.optimizer. Left at the demo's 'constant', the
    # benchmark would refuse every evaluation saved before 2026-12-07 22:00 as made with
    # another config.
    config.optimizer.schedule = "cosine"
    # A workdir, checkpoints/ folder or step folder of any run here (CMAE, MAE, MAE-CT or a
    # MAE-CT stage folder), or a published checkpoint (a .pth / .bin / .safetensors file or
    # an HF folder: README "Published checkpoints"); '' or 'random': a randomly
    # initialised encoder; 'pixels': raw pixels (the normalised image flattened).
    config.init = ""
    config.model_from_init = True
    # Any of 'knn', 'linear_probe', 'low_shot', 'clustering', 'finetune', 'pictures'.
    config.protocols = protocols
    config.log_every_steps = 100

    # k-NN: config.eval.knn_k, knn_temperature, feature (one of vit.POOLINGS).
    config.linear_probe = ml_collections.ConfigDict(
        dict(
            feature="cls",
            # Off: the probe trains on the eval-view features, extracted once when
            # cache_features (else the frozen encoder runs in every step).
            augment=False,
            cache_features=True,
            crop_scale=(0.08, 1.0),
            # MAE: LARS, base lr 0.1 at batch 16384 (lr 6.4). LARS moves each weight by
            # 0.001 x lr of its norm per step, too little at this batch of 256, so the
            # Fashion-MNIST default is SGD (momentum 0.9); 'lars' for the ImageNet recipe.
            optimizer="sgd",
            base_lr=0.1,  # lr = base_lr * batch_size / 256
            weight_decay=0.0,
            batch_size=256,
            num_epochs=20,  # MAE: 90 (ViT-B) / 50 (L, H) on ImageNet
            warmup_epochs=2.0,
        )
    )
    config.low_shot = ml_collections.ConfigDict(
        dict(
            shots=(1, 2, 5),
            fractions=(0.01, 0.1),
            seeds=(0, 1, 2),  # one subset per seed, accuracy averaged
            l2=1e-4,
            num_steps=300,  # L-BFGS iterations
        )
    )
    config.clustering = ml_collections.ConfigDict(
        dict(split="test", num_init=3, num_iters=100)  # k = config.dataset.num_classes
    )
    config.finetune = ml_collections.ConfigDict(
        dict(
            batch_size=256,
            num_epochs=10,  # SPEC: 100 (B) / 50 (L, H)
            total_steps=0,  # > 0 overrides num_epochs
            pooling="gap",  # global average pooling + fc_norm (SPEC), or 'cls'
            drop_path=0.1,  # SPEC: 0.1 (B) / 0.2 (L) / 0.3 (H)
            layer_decay=0.65,  # SPEC: 0.65 (B) / 0.75 (L, H)
            label_smoothing=0.1,
            mixup_alpha=0.8,
            cutmix_alpha=1.0,
            switch_prob=0.5,
            randaugment_ops=2,  # 0 = off; 'rand-m9-mstd0.5'
            randaugment_magnitude=9.0,
            randaugment_magnitude_std=0.5,
            random_erasing=0.25,
            crop_scale=(0.08, 1.0),
            optimizer=dict(
                base_lr=5e-4,  # MAE ViT-B: blr 5e-4 (lr = blr * batch / 256)
                min_lr=1e-6,
                b1=0.9,
                b2=0.999,
                weight_decay=0.05,
                warmup_epochs=1.0,  # SPEC/MAE: 5 of 100
                grad_clip_norm=0.0,
            ),
        )
    )
    config.pictures = ml_collections.ConfigDict(dict(num_images=8, embedding_points=3000))
    return config


# MAE-CT per encoder size, from the official yamls (ml-jku/MAE-CT, yamls/stage3_maect_
# contrastive_tuning/{base16,large16,huge16,huge14}.yaml; H/14 has H/16's values): pooling,
# stage-3 temperature, projector EMA momentum ("target_factor"), NN top-k and epochs, and
# the global batch of stages 2 and 3.
MAECT_SIZES = {
    "B": dict(
        pooling="mean", temperature=0.15, ema_momentum=0.99, topk=20, tune_epochs=20, batch=1024
    ),
    "L": dict(
        pooling="cls", temperature=0.2, ema_momentum=0.99, topk=20, tune_epochs=20, batch=1024
    ),
    "H": dict(
        pooling="cls", temperature=0.3, ema_momentum=0.995, topk=20, tune_epochs=30, batch=512
    ),
}
# What the "_aug" recipe changes besides the views: only stage 3, per size (yamls/stage3_
# maectaug_contrastive_tuning/*.yaml; its stage-2 yamls equal the plain ones but for views).
MAECT_AUG_SIZES = {
    "B": dict(temperature=0.15, topk=10, tune_epochs=80, head_lr=5e-4),
    "L": dict(temperature=0.15, topk=10, tune_epochs=40, head_lr=5e-4),
    "H": dict(temperature=0.35, topk=20, tune_epochs=40, head_lr=5e-4),
}
# The official stage-3 runs keep an EMA of the whole encoder (their `ema_logger`,
# target_factors [0.9999]); the released encoders and probes are those EMA weights.
MAECT_ENCODER_EMA = 0.9999


def _adamw(weight_decay: float, num_epochs: ml_collections.FieldReference):
    # MAE-CT's optimisers (official yamls): AdamW (0.9, 0.95), base lr 1e-4 scaled by
    # global_batch * 2 views / 256, linear warmup over the first 20% then cosine to 0.
    return ml_collections.ConfigDict(
        dict(
            base_lr=1e-4,
            views_per_example=2,
            min_lr=0.0,
            b1=0.9,
            b2=0.95,
            weight_decay=weight_decay,
            warmup_epochs=num_epochs * 0.2,
            grad_clip_norm=0.0,
        )
    )


def _contrastive_stage(
    *,
    num_epochs: int,
    batch: int,
    temperature: float,
    topk: int,
    ema_momentum: float,
    encoder_ema_momentum: float,
    freeze_encoder: bool,
    frozen_blocks: int,
    layer_decay: float,
    views: str,
) -> ml_collections.ConfigDict:
    stage = ml_collections.ConfigDict()
    # A workdir or checkpoint (step folder) of this project, or a published checkpoint
    # (e.g. the official mae_pretrain_vit_base.pth), to take the encoder (and, from a MAE-CT
    # stage, the heads and the queue) from; '' = the previous stage's sub-folder. Setting it
    # skips the stages before this one.
    stage.init_from = ""
    stage.num_epochs = num_epochs
    stage.total_steps = 0  # > 0 overrides num_epochs
    stage.temperature = temperature
    # Nearest-neighbour lookup: 0 = the nearest queue entry (argmax), k >= 1 = one of the k
    # nearest picked at random.
    stage.topk = topk
    # EMA momentum of the projector copy that fills the queue; 0 = no copy, the queue takes
    # the online projector's outputs (the official stage 2).
    stage.ema_momentum = ema_momentum
    # EMA momentum of the encoder (0 = none; the frozen part of the encoder is its own EMA).
    # The EMA encoder is kept in the optimiser state, evaluated beside the raw one at the
    # end of the stage, and published for readers (see published_encoder).
    stage.encoder_ema_momentum = encoder_ema_momentum
    # The encoder a finished stage with an encoder EMA hands to later stages, evaluations
    # and exports (weights.load_params): 'ema' (the official released weights) or
    # 'raw' (the trained weights themselves).
    stage.published_encoder = "ema"
    stage.freeze_encoder = freeze_encoder  # the whole encoder (stage 2)
    stage.frozen_blocks = frozen_blocks  # else: patch embedding, cls token and these blocks
    stage.layer_decay = layer_decay  # block i (1-based) gets layer_decay ** (depth + 1 - i)
    # Keys below override the top-level ones of the same name for this stage.
    stage.input = ml_collections.ConfigDict(
        dict(
            global_batch_size=batch,
            views=views,  # 'two_crops', or 'two_crops_aug': the "_aug" views (BYOL colour ops)
            crop_scale=(0.08, 1.0),
            view_augment=BYOL_VIEW_AUGMENT,
        )
    )
    epochs_ref = stage.get_ref("num_epochs")
    stage.optimizer = _adamw(0.05, epochs_ref)  # the encoder's (unused while it is frozen)
    stage.head_optimizer = _adamw(1e-5, epochs_ref)  # projector and predictor
    return stage


def maect_config(
    config: ml_collections.ConfigDict, size: str, *, aug: bool = False
) -> ml_collections.ConfigDict:
    """Turns a MAE config (stage 1) into the staged MAE-CT recipe of the official yamls.

    `size` ('B', 'L' or 'H') picks the per-size numbers of MAECT_SIZES, `aug` the
    "MAE-CT_aug" recipe (its views in stages 2 and 3 and MAECT_AUG_SIZES in stage 3). The
    top-level keys stay stage 1's (the MAE trainer reads them), config.stages.head / .tune
    hold stage 2 (NNCLR head on the frozen encoder) and stage 3 (contrastive tuning).
    """
    sizes = dict(MAECT_SIZES[size], head_lr=1e-4)
    if aug:
        sizes.update(MAECT_AUG_SIZES[size])
    views = "two_crops_aug" if aug else "two_crops"
    depth = vit.parse_variant(config.model.variant)["depth"]
    config.method = "maect"
    config.maect = ml_collections.ConfigDict(
        dict(
            pooling=sizes["pooling"],  # 'mean' patch token (B) or 'cls' token (L, H)
            projector_hidden=2048,
            predictor_hidden=4096,
            projection_dim=256,
            queue_size=65536,
        )
    )
    config.stages = ml_collections.ConfigDict()
    # Stage 2 as the official code: temperature 0.15 and the nearest neighbour (its head's
    # default topk 0) at every size, no projector EMA, 20 epochs.
    config.stages.head = _contrastive_stage(
        num_epochs=20,
        batch=sizes["batch"],
        temperature=0.15,
        topk=0,
        ema_momentum=0.0,
        encoder_ema_momentum=0.0,  # the encoder is frozen: it is its own EMA
        freeze_encoder=True,
        frozen_blocks=0,  # not read while the whole encoder is frozen
        layer_decay=1.0,
        views=views,
    )
    config.stages.tune = _contrastive_stage(
        num_epochs=sizes["tune_epochs"],
        batch=sizes["batch"],
        temperature=sizes["temperature"],
        topk=sizes["topk"],
        ema_momentum=sizes["ema_momentum"],
        encoder_ema_momentum=MAECT_ENCODER_EMA,
        freeze_encoder=False,
        frozen_blocks=depth // 2,
        layer_decay=0.65,
        views=views,
    )
    config.stages.tune.head_optimizer.base_lr = sizes["head_lr"]
    config.eval.feature = sizes["pooling"]
    return config


def fashion_mnist_maect_config() -> ml_collections.ConfigDict:
    """The CPU-sized MAE-CT demo of configs/fashion_mnist_maect.py (its docstring gives the
    departures from the ImageNet recipe); stage 1 is the Fashion-MNIST MAE demo."""
    config = maect_config(fashion_mnist_config("mae"), "B")
    config.maect.pooling = "cls"
    config.eval.feature = "cls"
    config.maect.projector_hidden = 512
    config.maect.predictor_hidden = 1024
    config.maect.projection_dim = 128
    config.maect.queue_size = 4096
    for stage in (config.stages.head, config.stages.tune):
        stage.input.global_batch_size = 256
        stage.input.crop_scale = (0.2, 1.0)
    config.stages.head.num_epochs = 1
    # 6 tuning epochs: from the 5-epoch MAE (80.09%), 2 gave 81.20% and 6 gave 82.31% k-NN
    # (README "Does it learn?"); the stage costs 3.1x the MAE step per image.
    config.stages.tune.num_epochs = 6
    # Higher base lrs for a schedule of a few hundred steps (as the MAE demo's 1e-3).
    config.stages.head.head_optimizer.base_lr = 5e-4
    config.stages.tune.head_optimizer.base_lr = 5e-4
    config.stages.tune.optimizer.base_lr = 2.5e-4
    # The official 0.9999 averages over 10,000 steps, 40% of ViT-B's 25,020 tuning steps;
    # 0.995 averages over 200 (14% of this stage's 1,404; measured: the EMA encoder 82.31%,
    # the raw one 82.25%). 0.9999 would leave the EMA encoder near where stage 3 started.
    config.stages.tune.encoder_ema_momentum = 0.995
    return config
