"""HF transformers ViTMAE folders: read (ViTMAEForPreTraining / ViTMAEModel, every key
spelling) and written (loadable by both classes' from_pretrained).

Layouts, from huggingface/transformers src/transformers/models/vit_mae/modeling_vit_mae.py
and conversion_mapping.py:
  ViTMAEForPreTraining: vit.* (the ViTMAEModel) + decoder.*; ViTMAEModel alone: no 'vit.'.
  Embeddings: embeddings.{cls_token, position_embeddings [1, 1+N, D] (fixed sin-cos,
  MAE's channel order), patch_embeddings.projection}; final norm: layernorm.
  Blocks, current names (transformers 5): layers.N.{layernorm_before, layernorm_after,
  attention.{q,k,v,o}_proj, mlp.{fc1, fc2}}; hub / transformers 4 names:
  encoder.layer.N.{layernorm_before, layernorm_after, attention.attention.{query,key,value},
  attention.output.dense, intermediate.dense, output.dense}.
  Decoder: decoder.{decoder_embed, mask_token, decoder_pos_embed, decoder_norm,
  decoder_pred}, blocks decoder.decoder_layers.N.* (either spelling; transformers 5.23's
  save_pretrained writes decoder.decoder_encoder.layer.N.*).
  config.json (ViTMAEConfig) gives the heads; preprocessor_config.json the normalisation.
Written here: the hub spelling, which transformers 4 loads as is and 5 converts on load.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from cmae_jax.interop import positions, state_dicts
from cmae_jax.interop.architecture import Architecture, DecoderSizes
from cmae_jax.interop.torch_layout import (
    LayoutError,
    TorchCheckpoint,
    block_indices,
    decoder_part,
    encoder_part,
    rename,
    summarize,
)

FORMAT = "HF transformers ViTMAE"
WEIGHTS = "model.safetensors"
# Marks a state dict as HF ViTMAE (either class).
SIGNATURE = "embeddings.patch_embeddings.projection.weight"

_BLOCK = [
    (r"layernorm_before\.(weight|bias)", r"norm1.\1"),
    (r"layernorm_after\.(weight|bias)", r"norm2.\1"),
    (r"attention\.attention\.query\.(weight|bias)", r"attn.q.\1"),
    (r"attention\.attention\.key\.(weight|bias)", r"attn.k.\1"),
    (r"attention\.attention\.value\.(weight|bias)", r"attn.v.\1"),
    (r"attention\.(q|k|v)_proj\.(weight|bias)", r"attn.\1.\2"),
    (r"attention\.output\.dense\.(weight|bias)", r"attn.proj.\1"),
    (r"attention\.o_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"mlp.fc1.\1"),
    (r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"mlp.fc2.\1"),
]
_ENCODER = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_DECODER = [
    (r"decoder\.decoder_embed\.(weight|bias)", r"embed.\1"),
    (r"decoder\.mask_token", "mask_token"),
    (r"decoder\.decoder_pos_embed", "pos_embed"),
    (r"decoder\.decoder_norm\.(weight|bias)", r"norm.\1"),
    (r"decoder\.decoder_pred\.(weight|bias)", r"pred.\1"),
]


def _blocks(state: dict[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    """(block tensors renamed to blocks.N.*, other keys): `prefix` is a regex whose group
    'n' is the layer number."""
    head = re.compile(rf"{prefix}\.(?P<rest>.+)")
    out, rest = {}, []
    for key, value in state.items():
        match = head.fullmatch(key)
        if match is None:
            rest.append(key)
            continue
        inner, unmatched = rename({match.group("rest"): value}, _BLOCK)
        if unmatched:
            raise LayoutError(f"{key}: not part of a ViTMAE layer that this project can hold.")
        (name,) = inner
        out[f"blocks.{match.group('n')}.{name}"] = value
    return out, rest


def _fuse_qkv(part: dict[str, Any], what: str) -> dict[str, Any]:
    """attn.{q,k,v} -> attn.qkv (weights stacked on the output axis, as timm's fused qkv);
    a missing bias (qkv_bias=False) becomes zero."""
    out = {k: v for k, v in part.items() if ".attn.q." not in k and ".attn.k." not in k}
    out = {k: v for k, v in out.items() if ".attn.v." not in k}
    for i in block_indices(part):
        weights = []
        for name in "qkv":
            key = f"blocks.{i}.attn.{name}.weight"
            if key not in part:
                raise LayoutError(f"{what}: {key} (the {name} projection of layer {i}) is missing.")
            weights.append(part[key])
        biases = [
            part.get(f"blocks.{i}.attn.{n}.bias", np.zeros(w.shape[0], np.float32))
            for n, w in zip("qkv", weights)
        ]
        out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(weights, axis=0)
        out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(biases, axis=0)
    return out


def read_hf(state: dict[str, Any], config: dict[str, Any] | None) -> TorchCheckpoint:
    """The parts of a ViTMAE state dict; `config` is its config.json (or None)."""
    config = config or {}
    checkpoint = TorchCheckpoint(
        format=FORMAT,
        method="mae",
        parts={},
        num_heads=config.get("num_attention_heads"),
        decoder_heads=config.get("decoder_num_attention_heads"),
        image_size=config.get("image_size"),
    )
    if config.get("hidden_act", "gelu") != "gelu":
        raise LayoutError(
            f"config.json: hidden_act={config['hidden_act']!r}; this project's ViT uses the "
            "exact GELU ('gelu')."
        )
    eps = config.get("layer_norm_eps")
    if eps is not None and eps != 1e-6:
        checkpoint.notes.append(
            f"config.json sets layer_norm_eps={eps}; this project uses MAE's 1e-6 (outputs "
            "differ by far less than bf16 rounding)"
        )
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    encoder_blocks, rest = _blocks(state, r"(?:encoder\.layer|layers)\.(?P<n>\d+)")
    encoder, rest = rename({k: state[k] for k in rest}, _ENCODER)
    encoder.update(_fuse_qkv(encoder_blocks, "encoder"))
    checkpoint.parts["encoder"] = encoder
    decoder_blocks, rest = _blocks(
        {k: state[k] for k in rest},
        r"decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(?P<n>\d+)",
    )
    decoder, rest = rename({k: state[k] for k in rest}, _DECODER)
    if decoder:
        decoder.update(_fuse_qkv(decoder_blocks, "decoder"))
        checkpoint.parts["pixel_decoder"] = decoder
    else:
        checkpoint.left_out.append("decoder absent: a ViTMAEModel (encoder only)")
    if rest:
        checkpoint.left_out.append(f"not part of the model here: {summarize(rest)}")
    return checkpoint


def _hf_block(part: dict[str, np.ndarray], i: int, prefix: str) -> dict[str, np.ndarray]:
    """One block of a neutral part in the hub spelling, qkv split into query/key/value."""
    src = f"blocks.{i}."
    qkv_w = np.split(part[f"{src}attn.qkv.weight"], 3, axis=0)
    qkv_b = np.split(part[f"{src}attn.qkv.bias"], 3, axis=0)
    out = {}
    for j, name in enumerate(("query", "key", "value")):
        out[f"{prefix}attention.attention.{name}.weight"] = qkv_w[j]
        out[f"{prefix}attention.attention.{name}.bias"] = qkv_b[j]
    pairs = {
        "attention.output.dense": "attn.proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
    }
    for hf_name, name in pairs.items():
        for kind in ("weight", "bias"):
            out[f"{prefix}{hf_name}.{kind}"] = part[f"{src}{name}.{kind}"]
    return out


def hf_tensors(
    encoder: dict[str, Any], pixel_decoder: dict[str, Any] | None, image_size: int
) -> dict[str, np.ndarray]:
    """The hub-spelled state dict: ViTMAEForPreTraining's with a decoder, else ViTMAEModel's."""
    part = encoder_part(encoder)
    width = part["cls_token"].shape[-1]
    side = image_size // part["patch_embed.proj.weight"].shape[-1]
    vit = "vit." if pixel_decoder is not None else ""
    out = {
        f"{vit}embeddings.cls_token": part["cls_token"],
        f"{vit}embeddings.position_embeddings": positions.stored_table(width, side),
        f"{vit}embeddings.patch_embeddings.projection.weight": part["patch_embed.proj.weight"],
        f"{vit}embeddings.patch_embeddings.projection.bias": part["patch_embed.proj.bias"],
        f"{vit}layernorm.weight": part["norm.weight"],
        f"{vit}layernorm.bias": part["norm.bias"],
    }
    for i in block_indices(part):
        out.update(_hf_block(part, i, f"{vit}encoder.layer.{i}."))
    if pixel_decoder is not None:
        dec = decoder_part(pixel_decoder)
        dec_width = dec["mask_token"].shape[-1]
        out["decoder.mask_token"] = dec["mask_token"]
        out["decoder.decoder_pos_embed"] = positions.stored_table(dec_width, side)
        for name in ("embed", "norm", "pred"):
            for kind in ("weight", "bias"):
                out[f"decoder.decoder_{name}.{kind}"] = dec[f"{name}.{kind}"]
        for i in block_indices(dec):
            out.update(_hf_block(dec, i, f"decoder.decoder_layers.{i}."))
    return out


def hf_config(
    architecture: Architecture,
    pixel_decoder: DecoderSizes | None,
    mask_ratio: float,
    norm_pix_loss: bool,
) -> dict[str, Any]:
    """config.json of a ViTMAEConfig with these sizes (MAE's 1e-6 LayerNorm eps)."""
    decoder = pixel_decoder or DecoderSizes(width=512, depth=8, num_heads=16, out_dim=0)
    return {
        "architectures": ["ViTMAEForPreTraining" if pixel_decoder else "ViTMAEModel"],
        "model_type": "vit_mae",
        "hidden_size": architecture.width,
        "num_hidden_layers": architecture.depth,
        "num_attention_heads": architecture.num_heads,
        "intermediate_size": architecture.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": architecture.image_size,
        "patch_size": architecture.patch_size,
        "num_channels": architecture.channels,
        "qkv_bias": True,
        "decoder_num_attention_heads": decoder.num_heads,
        "decoder_hidden_size": decoder.width,
        "decoder_num_hidden_layers": decoder.depth,
        "decoder_intermediate_size": 4 * decoder.width,
        "mask_ratio": mask_ratio,
        "norm_pix_loss": norm_pix_loss,
    }


def preprocessor_config(
    image_size: int, normalization: tuple[tuple[float, ...], tuple[float, ...]]
) -> dict[str, Any]:
    """preprocessor_config.json of a ViTImageProcessor: bicubic resize, rescale, normalise."""
    mean, std = normalization
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def write_hf(
    encoder: dict[str, Any],
    pixel_decoder: dict[str, Any] | None,
    architecture: Architecture,
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
    mask_ratio: float,
    norm_pix_loss: bool,
    folder: str,
) -> list[str]:
    """Writes config.json, model.safetensors and preprocessor_config.json; returns them."""
    if architecture.image_size is None:
        raise LayoutError("The image size is unknown; the position tables need it.")
    os.makedirs(folder, exist_ok=True)
    files = {
        "config.json": hf_config(
            architecture,
            architecture.pixel_decoder if pixel_decoder is not None else None,
            mask_ratio,
            norm_pix_loss,
        ),
        "preprocessor_config.json": preprocessor_config(architecture.image_size, normalization),
    }
    written = []
    for name, content in files.items():
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            json.dump(content, f, indent=2)
        written.append(path)
    weights = os.path.join(folder, WEIGHTS)
    state_dicts.write_safetensors(
        hf_tensors(encoder, pixel_decoder, architecture.image_size), weights
    )
    return [weights, *written]
