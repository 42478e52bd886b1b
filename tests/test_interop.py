"""Published checkpoints in and out (cmae_jax.interop), against the PyTorch references.

One small HF ViTMAEForPreTraining (192 wide, 4 blocks, 64 px, patch 8, decoder 64 wide)
with random weights is the reference: our reader of its saved folder must reproduce its
tokens, pixel predictions, loss and gradient; the same weights written by hand in the key
layouts of the official MAE, timm, CMAE and MAE-CT code must give the same trees; exports
must load in transformers and come back unchanged; bad files must fail with one clear
message and write nothing.
"""

import argparse
import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers.models.vit_mae import modeling_vit_mae  # noqa: E402

from cmae_jax import config_validation, losses, sharding, train_state, weights  # noqa: E402
from cmae_jax.config_defaults import IMAGENET_MEAN, eval_config  # noqa: E402
from cmae_jax.evaluation import features  # noqa: E402
from cmae_jax.interop import convert, export, import_checkpoint  # noqa: E402
from cmae_jax.interop.architecture import architecture_of  # noqa: E402
from cmae_jax.models import vit  # noqa: E402
from cmae_jax.models.cmae import CMAE  # noqa: E402
from cmae_jax.models.encoder_spec import EncoderSpec  # noqa: E402
from cmae_jax.models.heads import MLPHead  # noqa: E402

WIDTH, DEPTH, HEADS, PATCH, SIZE = 192, 4, 3, 8, 64
DEC_WIDTH, DEC_DEPTH, DEC_HEADS = 64, 2, 16
GRID = SIZE // PATCH
NUM_KEEP = GRID * GRID // 4
PROJ_HIDDEN, PROJ_DIM = 48, 16


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def hf_table(width, side):
    """HF's own MAE position table: its builder, halves rotated as ViTMAE does."""
    table = modeling_vit_mae.build_2d_sinusoidal_position_embedding(
        side, side, embed_dim=width, cls_token=True
    )
    half = width // 2
    return torch.cat([table[:, half:], table[:, :half]], dim=-1)[None]


def row_first_table(width, side):
    """The table of mmselfsup's build_2d_sincos_position_embedding (official CMAE code),
    written from its formula: meshgrid(w, h) with 'ij' indexing, float32, [sin, cos] of
    the first grid, then of the second."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(side, dtype=torch.float32),
        torch.arange(side, dtype=torch.float32),
        indexing="ij",
    )
    omega = 1.0 / 10000.0 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), table])[None]


def hf_model(table=hf_table):
    torch.manual_seed(0)
    config = transformers.ViTMAEConfig(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        image_size=SIZE,
        patch_size=PATCH,
        decoder_hidden_size=DEC_WIDTH,
        decoder_num_hidden_layers=DEC_DEPTH,
        decoder_num_attention_heads=DEC_HEADS,
        decoder_intermediate_size=4 * DEC_WIDTH,
        layer_norm_eps=1e-6,
        norm_pix_loss=True,
        mask_ratio=0.75,
    )
    model = transformers.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        # HF leaves both fixed tables at zero when it builds a model (SPEC).
        model.vit.embeddings.position_embeddings.copy_(table(WIDTH, GRID))
        model.decoder.decoder_pos_embed.copy_(table(DEC_WIDTH, GRID))
        for p in model.parameters():  # LayerNorms and biases away from their init values
            p.add_(0.02 * torch.randn_like(p))
        model.vit.embeddings.position_embeddings.copy_(table(WIDTH, GRID))
        model.decoder.decoder_pos_embed.copy_(table(DEC_WIDTH, GRID))
    return model


@pytest.fixture(scope="module")
def reference():
    return hf_model()


@pytest.fixture(scope="module")
def hf_folder(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    reference.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    noise = rng.uniform(size=(2, GRID * GRID)).astype(np.float32)
    order = np.argsort(noise, axis=1)  # HF keeps the lowest-noise patches
    return images, noise, order[:, :NUM_KEEP], order[:, NUM_KEEP:]


def tiny_encoder(**kwargs):
    return EncoderSpec(WIDTH, DEPTH, HEADS, 4 * WIDTH, PATCH, **kwargs)


def tiny_cmae(scan_layers=False, **kwargs):
    return CMAE(
        encoder_spec=tiny_encoder(scan_layers=scan_layers),
        pixel_decoder_width=DEC_WIDTH,
        pixel_decoder_depth=DEC_DEPTH,
        pixel_decoder_heads=DEC_HEADS,
        projector_hidden=PROJ_HIDDEN,
        projection_dim=PROJ_DIM,
        **kwargs,
    )


def close(ours, ref, tol=1e-5):
    ours, ref = np.asarray(ours), np.asarray(ref)
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * np.abs(ref).max())


def same_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------- Parity with HF


@jax.jit
def _forward_backward(params, x, ids_keep, ids_mask):
    model = tiny_cmae(contrastive=False)

    def loss_fn(params):
        out = model.apply({"params": params}, x, ids_keep, ids_mask, train=False)
        target = vit.patchify(x, PATCH)
        return losses.reconstruction_loss(out["pixel_pred"], target, ids_mask), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    tokens = model.apply(
        {"params": params}, x, ids_keep, method=lambda m, x, k: m.encoder(x, k).tokens
    )
    return tokens, out["pixel_pred"], loss, grads


def ours_outputs(params, images, ids_keep, ids_mask):
    """(encoder tokens, pixel predictions, norm-pix loss, gradients) of our CMAE-as-MAE."""
    return _forward_backward(params, jnp.asarray(images.transpose(0, 2, 3, 1)), ids_keep, ids_mask)


def test_hf_folder_gives_hf_numbers(reference, hf_folder, inputs):
    images, noise, ids_keep, ids_mask = inputs
    imported = import_checkpoint(hf_folder)
    assert imported.architecture.variant == "Ti/8" and imported.architecture.depth == DEPTH
    tokens, pred, loss, grads = ours_outputs(imported.params, images, ids_keep, ids_mask)
    reference.zero_grad()
    out = reference(torch.from_numpy(images), noise=torch.from_numpy(noise))
    out.loss.backward()
    with torch.no_grad():
        hf_tokens = reference.vit(torch.from_numpy(images), noise=torch.from_numpy(noise))
    close(tokens, hf_tokens.last_hidden_state.numpy())
    close(pred, out.logits.detach().numpy())
    close(loss, out.loss.item())
    hf_grad = reference.vit.embeddings.patch_embeddings.projection.weight.grad.numpy()
    close(grads["encoder"]["embedding"]["kernel"].transpose(3, 2, 0, 1), hf_grad)
    # Our fixed tables are HF's (its own builder computed the reference's).
    np.testing.assert_allclose(
        np.asarray(vit.sincos_2d_posemb(WIDTH, GRID, GRID)),
        reference.vit.embeddings.position_embeddings[0, 1:].numpy(),
        atol=1e-6,
    )


# ------------------------------------------------ The same weights in every key layout


def hf_blocks(sd, prefix, depth):
    """{i: {timm block name: tensor}} from HF's current names (transformers 5)."""
    out = {}
    for i in range(depth):
        h = f"{prefix}{i}."
        block = {
            "attn.qkv.weight": torch.cat([sd[f"{h}attention.{n}_proj.weight"] for n in "qkv"]),
            "attn.qkv.bias": torch.cat([sd[f"{h}attention.{n}_proj.bias"] for n in "qkv"]),
        }
        for name, hf in [
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("attn.proj", "attention.o_proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]:
            for kind in ("weight", "bias"):
                block[f"{name}.{kind}"] = sd[f"{h}{hf}.{kind}"]
        out[i] = block
    return out


MMCV_BLOCK = {
    "norm1": "ln1",
    "norm2": "ln2",
    "mlp.fc1": "ffn.layers.0.0",
    "mlp.fc2": "ffn.layers.1",
}


def mmcv_name(name):
    for timm, mmcv in MMCV_BLOCK.items():
        if name.startswith(timm + "."):
            return mmcv + name[len(timm) :]
    return name


def mae_state_dict(sd, with_decoder):
    """facebookresearch/mae MaskedAutoencoderViT keys."""
    out = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
    }
    for i, block in hf_blocks(sd, "vit.layers.", DEPTH).items():
        out.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    if with_decoder:
        out["mask_token"] = sd["decoder.mask_token"]
        out["decoder_pos_embed"] = sd["decoder.decoder_pos_embed"]
        for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
            for kind in ("weight", "bias"):
                out[f"{name}.{kind}"] = sd[f"decoder.{name}.{kind}"]
        for i, block in hf_blocks(sd, "decoder.decoder_layers.", DEC_DEPTH).items():
            out.update({f"decoder_blocks.{i}.{k}": v for k, v in block.items()})
    return out


def cmae_encoder(mae, final_norm=True):
    """mmselfsup/mmcv names of ZhichengHuang/CMAE's VisionTransformer."""
    out = {"cls_token": mae["cls_token"], "pos_embed": mae["pos_embed"]}
    out["patch_embed.projection.weight"] = mae["patch_embed.proj.weight"]
    out["patch_embed.projection.bias"] = mae["patch_embed.proj.bias"]
    if final_norm:
        out["ln1.weight"], out["ln1.bias"] = mae["norm.weight"], mae["norm.bias"]
    for key, value in mae.items():
        if key.startswith("blocks."):
            _, i, name = key.split(".", 2)
            out[f"layers.{i}.{mmcv_name(name)}"] = value
    return out


def cmae_decoder(mae):
    """ZhichengHuang/CMAE MAEPretrainDecoder keys."""
    out = {"mask_token": mae["mask_token"], "decoder_pos_embed": mae["decoder_pos_embed"]}
    for name in ("decoder_embed", "decoder_pred"):
        for kind in ("weight", "bias"):
            out[f"{name}.{kind}"] = mae[f"{name}.{kind}"]
    out["ln1.weight"], out["ln1.bias"] = mae["decoder_norm.weight"], mae["decoder_norm.bias"]
    for key, value in mae.items():
        if key.startswith("decoder_blocks."):
            _, i, name = key.split(".", 2)
            out[f"decoder_blocks.{i}.{mmcv_name(name)}"] = value
    return out


def torch_head(layers):
    """A torch MLP head (eval mode, non-trivial BatchNorm statistics)."""
    torch.manual_seed(1)
    head = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in head:
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                m.weight.copy_(torch.randn_like(m.weight))
                m.bias.copy_(torch.randn_like(m.bias))
    return head


def cmae_heads():
    """NonLinearNeck(num_layers=2, with_bias=True, with_last_bn=False) as projector and
    predictor; BatchNorm eps 1e-5 here, the eps of this project's heads."""
    lin, bn, relu = torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU
    projector = torch_head(
        [lin(WIDTH, PROJ_HIDDEN), bn(PROJ_HIDDEN), relu(), lin(PROJ_HIDDEN, PROJ_DIM, bias=False)]
    )
    predictor = torch_head(
        [
            lin(PROJ_DIM, PROJ_HIDDEN),
            bn(PROJ_HIDDEN),
            relu(),
            lin(PROJ_HIDDEN, PROJ_DIM, bias=False),
        ]
    )
    return projector, predictor


def neck_state(head):
    names = {0: "fc0", 1: "bn0", 3: "fc1"}
    return {
        f"{names[int(k.split('.')[0])]}.{k.split('.', 1)[1]}": v
        for k, v in head.state_dict().items()
    }


def write_cmae(path, sd, heads, final_norm=True):
    """A CMAE pretraining checkpoint as mmengine saves it."""
    mae = mae_state_dict(sd, with_decoder=True)
    state = {f"backbone.{k}": v for k, v in cmae_encoder(mae, final_norm).items()}
    state.update({f"target_backbone.{k}": v.clone() for k, v in cmae_encoder(mae, False).items()})
    for name in ("pixel_decoder", "feature_decoder"):
        state.update({f"{name}.{k}": v for k, v in cmae_decoder(mae).items()})
    projector, predictor = heads
    for prefix, head in (
        ("projector", projector),
        ("target_projector", projector),
        ("head.predictor", predictor),
    ):
        state.update({f"{prefix}.{k}": v for k, v in neck_state(head).items()})
    torch.save({"meta": {"epoch": 1600}, "state_dict": state}, path)


def maect_heads():
    lin, bn, relu = torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU
    projector = torch_head(
        [lin(WIDTH, PROJ_HIDDEN, bias=False), bn(PROJ_HIDDEN), relu(),
         lin(PROJ_HIDDEN, PROJ_HIDDEN, bias=False), bn(PROJ_HIDDEN), relu(),
         lin(PROJ_HIDDEN, PROJ_DIM, bias=False), bn(PROJ_DIM)]
    )  # fmt: skip
    predictor = torch_head(
        [lin(PROJ_DIM, 32, bias=False), bn(32), relu(), lin(32, PROJ_DIM, bias=False)]
    )
    return projector, predictor


def write_maect_stage(folder, sd, heads):
    """A MAE-CT stage's checkpoint files (CheckpointWriter, save_mode 'seperate')."""
    mae = mae_state_dict(sd, with_decoder=True)
    encoder = {k: v for k, v in mae.items() if not k.startswith(("decoder", "mask_token"))}
    encoder["pos_embed"] = encoder["pos_embed"][:, 1:]  # VitMae keeps no cls slot
    decoder = {"mask_token": mae["mask_token"], "pos_embed": mae["decoder_pos_embed"][:, 1:]}
    for key, value in mae.items():
        if key.startswith("decoder_") and key != "decoder_pos_embed":
            decoder[key.removeprefix("decoder_")] = value
    projector, predictor = heads
    head = {f"projector.{k}": v for k, v in projector.state_dict().items()}
    head.update({f"target_projector.{k}": v for k, v in projector.state_dict().items()})
    head.update({f"predictor.{k}": v for k, v in predictor.state_dict().items()})
    head["queue"] = torch.randn(64, PROJ_DIM)
    os.makedirs(folder, exist_ok=True)
    files = {
        "encoder": ({"state_dict": encoder, "ctor_kwargs": {"attention_heads": HEADS}}),
        "decoder": ({"state_dict": decoder, "ctor_kwargs": {"attention_heads": DEC_HEADS}}),
        "head.nnclr": ({"state_dict": head, "ctor_kwargs": {"kind": "nnclr_ema_queue_head"}}),
    }
    for name, content in files.items():
        torch.save(content, os.path.join(folder, f"mae_contheads_vit.{name} cp=last model.th"))
    return os.path.join(folder, "mae_contheads_vit.encoder cp=last model.th")


def head_output(tree, stats, head_module, x):
    return head_module.apply({"params": tree, "batch_stats": stats}, jnp.asarray(x), train=False)


@pytest.fixture(scope="module")
def layouts(reference, tmp_path_factory):
    """The reference's weights in every layout read here: {name: path}."""
    folder = tmp_path_factory.mktemp("layouts")
    sd = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    paths = {
        "mae_full": folder / "mae_visualize_vit_tiny.pth",
        "mae_encoder": folder / "mae_pretrain_vit_tiny.pth",
        "timm": folder / "vit_tiny_patch8_64.mae.safetensors",
        "cmae": folder / "cmae_vit-tiny.pth",
    }
    # Training checkpoints of the MAE code also pickle the argparse namespace.
    args = argparse.Namespace(model="mae_vit_tiny", norm_pix_loss=True)
    torch.save({"model": mae_state_dict(sd, True), "args": args, "epoch": 3}, paths["mae_full"])
    torch.save({"model": mae_state_dict(sd, False)}, paths["mae_encoder"])
    save_file({k: v.contiguous() for k, v in mae_state_dict(sd, False).items()}, paths["timm"])
    # HF folders: current key names (the model's own state dict) and ViTMAEModel alone.
    paths["hf_current_names"] = folder / "hf_current_names"
    reference.config.save_pretrained(paths["hf_current_names"])
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, paths["hf_current_names"] / "model.safetensors"
    )
    paths["hf_encoder"] = folder / "hf_encoder"
    reference.vit.save_pretrained(paths["hf_encoder"])
    heads = {"cmae": cmae_heads(), "maect": maect_heads()}
    write_cmae(paths["cmae"], sd, heads["cmae"])
    # tools/extract_backbone_weights.py: the online encoder alone, without its prefix.
    paths["cmae_backbone"] = folder / "cmae_backbone.pth"
    backbone = cmae_encoder(mae_state_dict(sd, with_decoder=False))
    torch.save({"state_dict": backbone, "author": "CMAE"}, paths["cmae_backbone"])
    paths["maect"] = write_maect_stage(folder / "maect_stage3", sd, heads["maect"])
    return {k: str(v) for k, v in paths.items()}, heads


def test_every_layout_gives_the_same_trees(hf_folder, layouts):
    paths, _ = layouts
    hf = import_checkpoint(hf_folder).params
    for name, path in paths.items():
        imported = import_checkpoint(path)
        same_trees(imported.params["encoder"], hf["encoder"])
        if name not in ("mae_encoder", "timm", "hf_encoder", "cmae_backbone"):
            same_trees(imported.params["pixel_decoder"], hf["pixel_decoder"])
    assert set(import_checkpoint(paths["mae_encoder"]).params) == {"encoder"}
    assert "decoder absent" in import_checkpoint(paths["timm"]).report()
    cmae = import_checkpoint(paths["cmae"])
    assert set(cmae.params) == {
        "encoder",
        "pixel_decoder",
        "feature_decoder",
        "projector",
        "predictor",
    }
    same_trees(cmae.params["feature_decoder"], hf["pixel_decoder"])
    assert "momentum (EMA) encoder and projector" in cmae.report()


def test_heads_compute_what_torch_computes(layouts):
    paths, heads = layouts
    x = np.random.default_rng(2).normal(size=(4, WIDTH)).astype(np.float32)
    cmae = import_checkpoint(paths["cmae"])
    maect = import_checkpoint(paths["maect"])
    cases = [
        (cmae, "projector", MLPHead(PROJ_HIDDEN, PROJ_DIM), heads["cmae"][0], x),
        (cmae, "predictor", MLPHead(PROJ_HIDDEN, PROJ_DIM), heads["cmae"][1], x[:, :PROJ_DIM]),
        (
            maect,
            "projector",
            MLPHead(PROJ_HIDDEN, PROJ_DIM, num_layers=3, hidden_bias=False, last_bn=True),
            heads["maect"][0],
            x,
        ),
        (
            maect,
            "predictor",
            MLPHead(32, PROJ_DIM, hidden_bias=False),
            heads["maect"][1],
            x[:, :PROJ_DIM],
        ),
    ]
    for imported, name, module, torch_module, inp in cases:
        ours = head_output(imported.params[name], imported.batch_stats[name], module, inp)
        with torch.no_grad():
            close(ours, torch_module(torch.from_numpy(inp)).numpy())


def test_row_first_tables_of_cmae_are_reordered(inputs, tmp_path):
    """The official CMAE code's transposed position tables: the import reorders channels so
    that our encoder gives the checkpoint's tokens (channels permuted) and pixels (equal)."""
    images, noise, ids_keep, ids_mask = inputs
    model = hf_model(row_first_table)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = str(tmp_path / "cmae.pth")
    write_cmae(path, sd, cmae_heads())
    imported = import_checkpoint(path)
    assert "row first" in imported.report()
    tokens, pred, _, _ = ours_outputs(imported.params, images, ids_keep, ids_mask)
    with torch.no_grad():
        out = model(torch.from_numpy(images), noise=torch.from_numpy(noise))
        hf_tokens = model.vit(torch.from_numpy(images), noise=torch.from_numpy(noise))
    swap = np.r_[WIDTH // 2 : WIDTH, 0 : WIDTH // 2]
    close(tokens, hf_tokens.last_hidden_state.numpy()[..., swap])
    close(pred, out.logits.numpy())


# ----------------------------------------------------------- Where a checkpoint is taken


def abstract_of(model, scan_layers=False):
    mesh = sharding.make_mesh(eval_config().mesh)
    rules = sharding.logical_axis_rules(())
    x = jnp.zeros((2, SIZE, SIZE, 3))
    keep, mask = jnp.zeros((2, NUM_KEEP), jnp.int32), jnp.zeros((2, 3 * NUM_KEEP), jnp.int32)
    init = lambda rng: model.init(rng, x, keep, mask, train=False)
    _, abstract = train_state.abstract_sharded_state(init, jax.random.key(0), mesh, rules)
    return abstract


PRETRAIN_OPTIONAL = ("pixel_decoder", "feature_decoder", "projector", "predictor")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_pretraining_init_from_official_mae_and_cmae(layouts, scan_layers):
    """The call the CMAE/MAE trainer makes for config.init_from."""
    paths, _ = layouts
    abstract = abstract_of(tiny_cmae(scan_layers=scan_layers))
    expected = {
        "mae_full": {"encoder", "pixel_decoder"},
        "cmae": set(PRETRAIN_OPTIONAL) | {"encoder"},
    }
    for name, keys in expected.items():
        params, stats = weights.load_params(
            paths[name],
            abstract["params"],
            required=("encoder",),
            optional=PRETRAIN_OPTIONAL,
            abstract_batch_stats=abstract["batch_stats"],
        )
        assert set(params) == keys
        assert set(stats) == ({"projector", "predictor"} if name == "cmae" else set())
        imported = import_checkpoint(paths[name])
        for key in keys:
            tree = imported.params[key]
            if scan_layers and "block_0" in tree:  # stacked as nn.scan keeps them
                blocks = [
                    tree[f"block_{i}"]
                    for i in range(len([k for k in tree if k.startswith("block_")]))
                ]
                tree = {k: v for k, v in tree.items() if not k.startswith("block_")}
                tree["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
            same_trees(params[key], tree)
            shardings = jax.tree.map(lambda a: a.sharding, abstract["params"][key])
            assert jax.tree.map(lambda a: a.sharding, params[key]) == shardings


def test_evaluation_takes_the_encoder_from_the_file(layouts, hf_folder):
    paths, _ = layouts
    config = eval_config()
    config.init = paths["timm"]
    config_validation.validate(config, num_devices=jax.device_count(), check_data=False)
    resolved = features.resolve_config(config)
    assert resolved.model.variant == "Ti/8" and resolved.model.depth == DEPTH
    assert resolved.input.image_size == SIZE and resolved.input.channels == 3
    assert tuple(resolved.input.mean) == IMAGENET_MEAN
    _, params = features.load_encoder(resolved.init, resolved)
    same_trees(params["encoder"], import_checkpoint(hf_folder).params["encoder"])

    # An explicit config.model that does not fit: the error names both and the fix.
    config.model_from_init = False
    with pytest.raises(ValueError, match=r"192 wide, 4 blocks.*--config.model.variant=Ti/8"):
        features.load_encoder(config.init, features.resolve_config(config))


def test_config_validation_accepts_published_paths(layouts):
    from cmae_jax.config_defaults import fashion_mnist_config, fashion_mnist_maect_config

    paths, _ = layouts
    config = fashion_mnist_config("mae")
    config.init_from = paths["mae_full"]
    config_validation.validate(config, num_devices=1, check_data=False)
    maect = fashion_mnist_maect_config()
    maect.stages.head.init_from = paths["mae_encoder"]
    config_validation.validate(maect, num_devices=1, check_data=False)
    config.init_from = paths["mae_full"] + ".missing"
    with pytest.raises(config_validation.ConfigError, match="config.init_from.*No checkpoint"):
        config_validation.validate(config, num_devices=1, check_data=True)
    evaluation = eval_config()
    evaluation.init_from = paths["mae_full"]
    with pytest.raises(config_validation.ConfigError, match="use config.init"):
        config_validation.validate(evaluation, num_devices=1, check_data=False)


def test_maect_stage_starts_from_official_weights(layouts):
    """train_maect.load_pretrained (stage 2 from mae_pretrain_*.pth; stage 3 from a MAE-CT
    stage with its NNCLR head)."""
    from cmae_jax.methods import maect as train_maect
    from cmae_jax.models.maect import MAECT

    paths, _ = layouts
    model = MAECT(
        tiny_encoder(),
        projector_hidden=PROJ_HIDDEN,
        predictor_hidden=32,
        projection_dim=PROJ_DIM,
    )
    mesh = sharding.make_mesh(eval_config().mesh)
    init = lambda rng: model.init(rng, jnp.zeros((2, SIZE, SIZE, 3)), train=False)
    _, abstract = train_state.abstract_sharded_state(init, jax.random.key(0), mesh, ())
    state = types.SimpleNamespace(params=abstract["params"], batch_stats=abstract["batch_stats"])
    params, stats = train_maect.load_pretrained(paths["mae_encoder"], state)
    assert set(params) == {"encoder"} and not stats
    params, stats = train_maect.load_pretrained(paths["maect"], state)
    assert set(params) == {"encoder", "projector", "predictor"}
    assert set(stats) == {"projector", "predictor"}


# ------------------------------------------------------------------ Convert and export


def test_convert_export_round_trip(hf_folder, inputs, tmp_path):
    images = inputs[0]
    workdir = str(tmp_path / "converted")
    imported = convert.convert(hf_folder, workdir)
    abstract = abstract_of(tiny_cmae(contrastive=False))
    params, _ = weights.load_params(
        workdir, abstract["params"], required=("encoder", "pixel_decoder")
    )
    same_trees(params, imported.params)

    hf_out = str(tmp_path / "hf")
    export.export(workdir, "hf", hf_out)
    same_trees(import_checkpoint(hf_out).params, imported.params)
    _, info = transformers.ViTMAEForPreTraining.from_pretrained(hf_out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # As the README's snippet: no masking, and noise in grid order keeps the patches in order.
    encoder, info = transformers.ViTMAEModel.from_pretrained(
        hf_out, mask_ratio=0.0, output_loading_info=True
    )
    assert not info["missing_keys"]
    order = torch.arange(float(GRID * GRID)).expand(len(images), -1)
    with torch.no_grad():
        hf_tokens = encoder.eval()(torch.from_numpy(images), noise=order).last_hidden_state
    x = jnp.asarray(images.transpose(0, 2, 3, 1))
    ours = vit.Encoder(WIDTH, DEPTH, HEADS, 4 * WIDTH, PATCH).apply(
        {"params": imported.params["encoder"]}, x
    )
    close(ours.tokens, hf_tokens.numpy())

    timm_out = str(tmp_path / "timm")
    export.export(workdir, "timm", timm_out)
    tensors = import_checkpoint(timm_out)
    same_trees(tensors.params["encoder"], imported.params["encoder"])
    from safetensors.numpy import load_file

    keys = set(load_file(os.path.join(timm_out, "model.safetensors")))
    # timm/models/vision_transformer.py VisionTransformer(num_classes=0): every key of its
    # state dict (Block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    timm_keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    timm_keys |= {"norm.weight", "norm.bias"}
    timm_keys |= {
        f"blocks.{i}.{b}.{k}" for i in range(DEPTH) for b in block for k in ("weight", "bias")
    }
    assert keys == timm_keys


def test_export_refuses_an_encoder_with_a_conv_stem():
    """The formats have no place for a conv stem; writing one without it would be wrong."""
    encoder = tiny_encoder(stem_channels=4, channels=3).encoder()
    images = jnp.zeros((1, SIZE, SIZE, 3))
    params = jax.eval_shape(lambda: encoder.init(jax.random.key(0), images))["params"]
    params = jax.tree.map(np.zeros_like, nn.meta.unbox(params))
    with pytest.raises(ValueError, match=r"convolutional patch stem \(stem_conv0, stem_conv1, "):
        architecture_of({"encoder": params}, SIZE)


# -------------------------------------------------------------------------- Bad input


def bad_files(folder, layouts, hf_folder):
    """{name: (path, expected message)}."""
    paths, _ = layouts
    out = {}
    (folder / "notes.pth").write_text("not a checkpoint")
    out["not a checkpoint"] = (folder / "notes.pth", r"not a PyTorch checkpoint")
    (folder / "noise.safetensors").write_bytes(os.urandom(64))
    out["not safetensors"] = (folder / "noise.safetensors", r"not a safetensors file|truncated")
    for name in ("mae_full", "timm"):
        with open(paths[name], "rb") as f:
            data = f.read()
        suffix = os.path.splitext(paths[name])[1]
        (folder / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        out[f"truncated {name}"] = (folder / f"cut{suffix}", r"truncated")
    rng = np.random.default_rng(0)
    odd = {
        "cls_token": rng.normal(size=(1, 1, 100)),
        "patch_embed.proj.weight": rng.normal(size=(100, 3, 8, 8)),
    }
    odd["blocks.0.mlp.fc1.weight"] = rng.normal(size=(400, 100))
    save_file(
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in odd.items()},
        folder / "odd.safetensors",
    )
    out["fits no variant"] = (
        folder / "odd.safetensors",
        r"100 wide: no ViT variant has that width.*fit no variant",
    )
    sd = mae_state_dict({k: v.detach() for k, v in hf_model().state_dict().items()}, False)
    sd["pos_embed"] = torch.zeros_like(sd["pos_embed"])  # a ViTMAE built without its table
    torch.save({"model": sd}, folder / "zero_table.pth")
    out["position table"] = (
        folder / "zero_table.pth",
        r"differs from the fixed 2-D sin-cos table by up to 1",
    )
    return out


def test_bad_input_fails_clearly_and_writes_nothing(layouts, hf_folder, tmp_path):
    for name, (path, message) in bad_files(tmp_path, layouts, hf_folder).items():
        workdir = tmp_path / f"out_{name.replace(' ', '_')}"
        with pytest.raises(ValueError, match=message):
            convert.convert(str(path), str(workdir))
        assert not workdir.exists(), name


def test_convert_command_reports_errors(tmp_path):
    (tmp_path / "x.pth").write_text("hello")
    workdir = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmae_jax.interop.convert",
            f"--from={tmp_path / 'x.pth'}",
            f"--to={workdir}",
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 2
    assert "not a PyTorch checkpoint" in result.stderr
    assert not workdir.exists()


def damaged_run(folder):
    """A workdir whose newest step folder holds a `state` that orbax cannot read."""
    state = folder / "damaged_run" / "checkpoints" / "3" / "state"
    state.mkdir(parents=True)
    (state / "_METADATA").write_text("{not json")
    return folder / "damaged_run", r"cannot be read"


def checkpoint_takers():
    """[(key, config, the section holding the key)]: pretraining, MAE-CT, evaluation."""
    from cmae_jax.config_defaults import fashion_mnist_config, fashion_mnist_maect_config

    pretraining, maect, evaluation = (
        fashion_mnist_config("mae"),
        fashion_mnist_maect_config(),
        eval_config(("knn",)),
    )
    return [
        ("config.init_from", pretraining, pretraining),
        ("config.stages.head.init_from", maect, maect.stages.head),
        ("config.init", evaluation, evaluation),
    ]


def test_bad_checkpoint_is_a_config_error_wherever_one_is_taken(layouts, hf_folder, tmp_path):
    cases = bad_files(tmp_path, layouts, hf_folder)
    cases["damaged run"] = damaged_run(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    for path, message in cases.values():
        for key, config, section in checkpoint_takers():
            section[key.rsplit(".", 1)[1]] = str(path)
            with pytest.raises(config_validation.ConfigError, match=f"{key}: .*({message})"):
                config_validation.validate(config, num_devices=1, check_data=True)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_evaluation_command_refuses_a_bad_file_before_writing(tmp_path):
    (tmp_path / "garbage.pth").write_text("hello")
    workdir = tmp_path / "eval"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmae_jax.main",
            "--config=configs/eval/knn.py",
            f"--config.init={tmp_path / 'garbage.pth'}",
            f"--workdir={workdir}",
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Config error: config.init: " in result.stderr
    assert "not a PyTorch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_torch_files_without_torch_say_how_to_install(layouts, monkeypatch):
    paths, _ = layouts
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ValueError, match="pip install torch"):
        import_checkpoint(paths["mae_encoder"])


def test_fine_tuned_mae_loads_its_encoder(reference, tmp_path):
    sd = mae_state_dict({k: v.detach().clone() for k, v in reference.state_dict().items()}, False)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    sd["head.weight"], sd["head.bias"] = torch.randn(10, WIDTH), torch.zeros(10)
    sd["pos_embed"] = sd["pos_embed"] + 1e-3 * torch.randn_like(sd["pos_embed"])  # trained
    torch.save({"model": sd}, tmp_path / "mae_finetuned.pth")
    imported = import_checkpoint(str(tmp_path / "mae_finetuned.pth"))
    report = imported.report()
    assert "fc_norm" in report and "head (2 tensors)" in report
    assert "trained during fine-tuning" in report
    np.testing.assert_array_equal(
        imported.params["encoder"]["norm"]["scale"], sd["fc_norm.weight"].numpy()
    )
