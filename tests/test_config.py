"""Config validation errors, the CLI's refusal before compiling, and every shipped config."""

import glob
import importlib.util
import os
import subprocess
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from cmae_jax import config_validation, ema
from cmae_jax.config_defaults import base_config, fashion_mnist_config, set_variant
from cmae_jax.config_validation import ConfigError
from cmae_jax.methods import cmae as train_cmae
from cmae_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def load_config(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def valid_config(small_fashion_mnist):
    config = fashion_mnist_config("cmae")
    config.dataset.idx_dir = small_fashion_mnist
    return config


def test_the_demo_config_is_valid(small_fashion_mnist):
    config_validation.validate(valid_config(small_fashion_mnist), num_devices=8)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("input.mask_ratio", 0.0, "config.input.mask_ratio=0.0 is outside (0, 1)"),
        ("input.mask_ratio", 1.5, "config.input.mask_ratio=1.5 is outside (0, 1)"),
        ("input.image_size", 30, "config.input.image_size=30 is not divisible by the patch size"),
        ("input.global_batch_size", 100, "global_batch_size=100 is not divisible by the 8 devices"),
        ("dataset.name", "imagenet", "config.dataset.name='imagenet' is unknown"),
        ("model.variant", "XL/16", "config.model.variant='XL/16'"),
        ("model.variant", "B/8", "config.input.patch_size=7 differs from the patch size 8"),
        ("input.mask_type", "grid", "config.input.mask_type"),
        ("method", "simclr", "config.method='simclr' is unknown"),
        ("model.dtype", "float16", "config.model.dtype"),
        ("loss.temperature", 0.0, "config.loss.temperature=0.0 must be > 0"),
        ("input.target_view", False, "needs the target view"),
        ("input.blur_prob", 1.5, "config.input.blur_prob=1.5 is a probability"),
        ("input.erase_prob", -0.1, "config.input.erase_prob=-0.1 is a probability"),
        ("input.crop_scale", (0.2, 1.0, 0.5), "crop_scale=(0.2, 1.0, 0.5) must be two"),
        ("input.crop_scale", (0.0, 1.0), "config.input.crop_scale=(0.0, 1.0) must satisfy"),
        ("input.crop_ratio", (2.0, 0.5), "config.input.crop_ratio=(2.0, 0.5) must satisfy"),
        ("input.blur_sigma", (0.1,), "config.input.blur_sigma=(0.1,) must be two numbers"),
        ("mesh.fsdp", 3, "config.mesh="),
        ("eval.feature", "max", "config.eval.feature='max' is not one of cls, mean, cls+mean"),
        ("model.contrastive_pooling", "max", "config.model.contrastive_pooling='max' is not one"),
        ("input.master_mode", "crop", "config.input.master_mode='crop' is not one of resize, pad"),
        ("logical_axis_rules", (("embed", "model"),), "names mesh axis 'model'"),
        ("optimizer.schedule", "linear", "config.optimizer.schedule='linear' is not one of"),
    ],
)
def test_config_errors_name_the_key(small_fashion_mnist, key, value, message):
    config = valid_config(small_fashion_mnist)
    section, name = key.split(".") if "." in key else (None, key)
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError) as error:
        config_validation.validate(config, num_devices=8)
    assert message in str(error.value)


def test_the_conv_stem_is_refused_where_batch_and_tensor_axes_are_both_split(small_fashion_mnist):
    """The meshes whose stem step test_sharding found unlike one device's; the others pass."""
    config = valid_config(small_fashion_mnist)
    config.model.stem_channels = 16
    for data, fsdp, tensor in [(8, 1, 1), (2, 4, 1), (1, 1, 8)]:
        config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
        config_validation.validate(config, num_devices=8)
    for data, fsdp, tensor in [(4, 1, 2), (2, 2, 2), (1, -1, 2)]:
        config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
        with pytest.raises(
            ConfigError, match=r"stem_channels=16 with a mesh .* --config.mesh.tensor=1"
        ):
            config_validation.validate(config, num_devices=8)
    config.model.stem_channels = 0
    config_validation.validate(config, num_devices=8)


def test_erasing_boxes_are_checked_only_when_erasing_is_on(small_fashion_mnist):
    config = valid_config(small_fashion_mnist)
    config.input.erase_scale = (0.0, 1.0)
    config_validation.validate(config, num_devices=8)  # erase_prob 0: the box is not used
    config.input.erase_prob = 0.25
    with pytest.raises(ConfigError, match=r"config\.input\.erase_scale=\(0\.0, 1\.0\)"):
        config_validation.validate(config, num_devices=8)
    config.input.erase_scale, config.input.erase_ratio = (0.02, 0.33), (3.0, 0.3)
    with pytest.raises(ConfigError, match=r"config\.input\.erase_ratio=\(3\.0, 0\.3\)"):
        config_validation.validate(config, num_devices=8)


def test_a_per_view_pair_given_twice_on_the_command_line_is_refused():
    # ml_collections joins the two values into (0.0, 0.0, 1.0, 0.1); the views would read
    # the first two and blur neither view.
    path = os.path.join(REPO, "configs", "fashion_mnist_mocov3.py")
    key = "config.input.view_augment.blur_prob"
    argv = ["main", f"--config={path}", f"--{key}=(0.0,0.0)", f"--{key}=(1.0,0.1)"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", path, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    with pytest.raises(ConfigError, match=r"blur_prob=\(0\.0, 0\.0, 1\.0, 0\.1\) must be two"):
        config_validation.validate(flag_values.config, num_devices=1, check_data=False)


def test_the_views_of_each_maect_stage_are_checked():
    config = load_config(os.path.join(REPO, "configs", "fashion_mnist_maect.py"))
    augment = config.stages.tune.input.view_augment
    augment.solarize_prob = (0.0, 1.5)
    # Unused by the plain two-crop views, so not refused.
    config.stages.tune.input.views = "two_crops"
    config_validation.validate(config, num_devices=1, check_data=False)
    config.stages.tune.input.views = "two_crops_aug"
    key = r"config\.stages\.tune\.input\.view_augment\.solarize_prob\[1\]=1\.5"
    with pytest.raises(ConfigError, match=key + " is a probability"):
        config_validation.validate(config, num_devices=1, check_data=False)
    augment.solarize_prob = (0.0, 0.2)
    config.stages.head.input.crop_scale = (0.2, 1.0, 0.2, 1.0)
    with pytest.raises(ConfigError, match=r"config\.stages\.head\.input\.crop_scale=\(0\.2,"):
        config_validation.validate(config, num_devices=1, check_data=False)


def test_a_block_size_that_does_not_tile_the_grid_is_refused(small_fashion_mnist):
    config = valid_config(small_fashion_mnist)
    config.input.mask_type, config.input.mask_block = "block", 3  # 3 does not divide a 4x4 grid
    with pytest.raises(ConfigError, match=r"config\.input\.mask_block=3"):
        config_validation.validate(config, num_devices=8)


def test_missing_data_files_name_the_folder_and_fix(tmp_path):
    config = fashion_mnist_config("cmae")
    config.dataset.idx_dir = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as error:
        config_validation.validate(config, num_devices=1)
    text = str(error.value)
    assert "nowhere" in text and "config.dataset.idx_dir" in text
    assert "dataset-fashion-mnist" in text


def test_cli_refuses_bad_values_before_compiling(tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmae_jax.main",
            "--config=configs/fashion_mnist_cmae.py",
            f"--workdir={workdir}",
            "--config.input.mask_ratio=1.5",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 2
    assert "Config error: config.input.mask_ratio=1.5 is outside (0, 1)" in out.stderr
    assert not workdir.exists()  # nothing was written


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_shipped_configs_build_abstractly(path):
    config = load_config(path)
    config_validation.validate(config, num_devices=1, check_data=False)
    model, tx, _, _ = train_cmae.make_model_and_optimizer(config, 1000, 100_000)
    init_state = train_cmae.make_init_state(model, tx, config)
    state = jax.eval_shape(init_state, jax.random.key(0))
    params = state.params
    assert "encoder" in params and "pixel_decoder" in params
    if config.loss.contrastive_weight > 0:
        target = ema.target_params(state.opt_state)
        assert jax.tree.structure(target["encoder"]) == jax.tree.structure(params["encoder"])
        assert "feature_decoder" in params and "predictor" in params
    else:
        assert "projector" not in params


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_shipped_configs_take_their_variants_defaults(path):
    # A config that sets config.model.variant by hand misses the mesh of its size (FSDP
    # for L and H) and the patch size; set_variant gives both.
    config = load_config(path)
    expected = base_config("mae")
    set_variant(expected, config.model.variant)
    assert config.mesh.to_dict() == expected.mesh.to_dict()
    assert config.input.patch_size == expected.input.patch_size


@pytest.mark.parametrize(
    "name, millions", [("cmae_vitb.py", 86), ("cmae_vitl.py", 304), ("cmae_vith.py", 632)]
)
def test_paper_encoders_have_the_known_parameter_counts(name, millions):
    config = load_config(os.path.join(REPO, "configs", name))
    model, tx, _, _ = train_cmae.make_model_and_optimizer(config, 1000, 100_000)
    state = jax.eval_shape(train_cmae.make_init_state(model, tx, config), jax.random.key(0))
    count = vit.count_params(state.params["encoder"])
    # The papers' counts include the fixed position embedding, a constant here.
    grid = config.input.image_size // config.input.patch_size
    width = vit.parse_variant(config.model.variant)["width"]
    with_posemb = count + (grid * grid + 1) * width
    assert abs(with_posemb / 1e6 - millions) / millions < 0.01, with_posemb
