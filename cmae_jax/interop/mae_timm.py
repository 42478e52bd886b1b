"""The official MAE / timm key layout: read (pretrained, visualise and fine-tuned MAE
checkpoints, timm `vit_*_patch*_224.mae`) and written (timm-keyed encoder).

Layouts, from the code that writes them:
  facebookresearch/mae models_mae.py, MaskedAutoencoderViT (saved as {'model': state_dict}
  by util/misc.py save_model, with 'optimizer', 'epoch', 'scaler', 'args' in training
  checkpoints): cls_token, pos_embed [1, 1+N, D] (fixed sin-cos, cls row zero),
  patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm;
  the decoder mask_token, decoder_embed, decoder_pos_embed, decoder_blocks.N.*,
  decoder_norm, decoder_pred (mae_visualize_*, *_full). Released mae_pretrain_* hold the
  encoder only.
  facebookresearch/mae models_vit.py (fine-tuned): the same encoder, with global pooling
  `norm` replaced by `fc_norm`, plus the classifier `head`.
  huggingface/pytorch-image-models timm/models/vision_transformer.py, VisionTransformer
  (Block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2; PatchEmbed.proj): the same
  encoder keys; `vit_{base,large}_patch16_224.mae` and `vit_huge_patch14_224.mae` are the
  MAE files themselves.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from cmae_jax.interop import positions, state_dicts
from cmae_jax.interop.architecture import Architecture
from cmae_jax.interop.torch_layout import (
    LayoutError,
    TorchCheckpoint,
    encoder_part,
    rename,
    summarize,
    unwrap_state_dict,
)

FORMAT = "official MAE / timm"
BLOCK = r"(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
ENCODER_RULES = [
    (r"(cls_token|pos_embed)", r"\1"),
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (rf"blocks\.(\d+)\.{BLOCK}", r"blocks.\1.\2.\3"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]
DECODER_RULES = [
    (r"decoder_embed\.(weight|bias)", r"embed.\1"),
    (r"mask_token", "mask_token"),
    (r"decoder_pos_embed", "pos_embed"),
    (rf"decoder_blocks\.(\d+)\.{BLOCK}", r"blocks.\1.\2.\3"),
    (r"decoder_norm\.(weight|bias)", r"norm.\1"),
    (r"decoder_pred\.(weight|bias)", r"pred.\1"),
]
TIMM_WEIGHTS = "model.safetensors"


def split_encoder(state: dict[str, Any], checkpoint: TorchCheckpoint) -> list[str]:
    """Puts the timm-keyed encoder of `state` into checkpoint.parts['encoder']; returns the
    keys it did not take. A fine-tuned encoder's fc_norm (no `norm`) becomes its final norm."""
    encoder, rest = rename(state, ENCODER_RULES)
    strays = [k for k in rest if k.startswith(("blocks.", "patch_embed."))]
    if strays:
        raise LayoutError(
            f"Tensors {strays[:4]} are not part of this project's ViT block (pre-norm, fused "
            "qkv with bias, MLP; no layer scale): the checkpoint's model differs."
        )
    if any(k.startswith(("head.", "fc_norm.")) for k in rest):
        checkpoint.fine_tuned = True
    if "norm.weight" not in encoder and "fc_norm.weight" in state:
        encoder["norm.weight"] = state["fc_norm.weight"]
        encoder["norm.bias"] = state["fc_norm.bias"]
        rest = [k for k in rest if not k.startswith("fc_norm.")]
        checkpoint.notes.append(
            "fine-tuned with global pooling: its fc_norm (applied after pooling there) is "
            "loaded as the encoder's final LayerNorm (applied to every token here)"
        )
    checkpoint.parts["encoder"] = encoder
    return rest


def read_mae_timm(content: Any) -> TorchCheckpoint:
    """Official MAE (pretrained, visualise, fine-tuned) or timm ViT-MAE weights."""
    state = unwrap_state_dict(content)
    checkpoint = TorchCheckpoint(format=FORMAT, method="mae", parts={})
    rest = split_encoder(state, checkpoint)
    decoder, rest = rename({k: state[k] for k in rest}, DECODER_RULES)
    if decoder:
        checkpoint.parts["pixel_decoder"] = decoder
    else:
        checkpoint.left_out.append("decoder absent: encoder-only checkpoint")
    if rest:
        checkpoint.left_out.append(f"not part of the model here: {summarize(rest)}")
    return checkpoint


def timm_tensors(encoder: dict[str, Any], image_size: int) -> dict[str, np.ndarray]:
    """The timm VisionTransformer state dict of params['encoder'] (pos_embed for
    `image_size`, cls row zero; no head: timm's num_classes=0)."""
    part = encoder_part(encoder)
    width = part["cls_token"].shape[-1]
    patch = part["patch_embed.proj.weight"].shape[-1]
    part["pos_embed"] = positions.stored_table(width, image_size // patch)
    return part


def write_timm(
    encoder: dict[str, Any],
    architecture: Architecture,
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
    crop_fraction: float,
    folder: str,
) -> list[str]:
    """Writes FOLDER/model.safetensors (timm keys) and a timm config.json (architecture
    vit_base_patch16_224 with model_args for the sizes); returns the files written."""
    if architecture.image_size is None:
        raise LayoutError("The image size is unknown; the position table needs it.")
    tensors = timm_tensors(encoder, architecture.image_size)
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, TIMM_WEIGHTS)
    state_dicts.write_safetensors(tensors, weights)
    mean, std = normalization
    size = architecture.image_size
    config = {
        "architecture": "vit_base_patch16_224",
        "num_classes": 0,
        "model_args": {
            "img_size": size,
            "patch_size": architecture.patch_size,
            "in_chans": architecture.channels,
            "embed_dim": architecture.width,
            "depth": architecture.depth,
            "num_heads": architecture.num_heads,
            "mlp_ratio": architecture.mlp_dim / architecture.width,
            "global_pool": "token",
        },
        "pretrained_cfg": {
            "input_size": [architecture.channels, size, size],
            "interpolation": "bicubic",
            "crop_pct": crop_fraction,
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    config_path = os.path.join(folder, "config.json")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return [weights, config_path]
