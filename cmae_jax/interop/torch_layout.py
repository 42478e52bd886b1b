"""The tensors of a PyTorch ViT and this project's parameter trees, in both directions.

Every reader first renames its file's keys into one neutral layout per sub-model (a
"part": a flat dict of torch-shaped NumPy arrays), and every writer starts from it:

  encoder  cls_token [1,1,D], pos_embed, patch_embed.proj.{weight [D,C,p,p], bias},
           blocks.N.{norm1, attn.qkv [3D,D], attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias},
           norm.{weight, bias}                 (timm's and official MAE's names)
  decoder  embed, mask_token, pos_embed, blocks.N.* as above, norm, pred
                                               (official MAE's names without 'decoder_')
  MLP head dense_K.{weight, bias}, bn_K.{weight, bias, running_mean, running_var}

Torch Linear weights are [out, in], flax kernels [in, out]; the fused qkv output is
ordered (q/k/v, head, head_dim) and the attention output's input (head, head_dim), as in
timm's Attention. Patch embedding: torch Conv2d [D, C, p, p] vs flax Conv [p, p, C, D].
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

Part = dict[str, np.ndarray]


@dataclasses.dataclass
class TorchCheckpoint:
    """What a reader found: parts keyed by this project's sub-model names ('encoder',
    'pixel_decoder', 'feature_decoder', 'projector', 'predictor'), in the neutral layout."""

    format: str  # e.g. "official MAE / timm"
    method: str  # the config.method whose model holds these parts: 'mae', 'cmae', 'maect'
    parts: dict[str, Part]
    num_heads: int | None = None  # from the file's own config, when it has one
    decoder_heads: int | None = None
    fine_tuned: bool = False  # a classifier was trained on it (its position table may drift)
    # (mean, std) of the input normalisation, when the file says.
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    image_size: int | None = None  # from the file's config, when it has no position table
    left_out: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def summarize(keys: Iterable[str]) -> str:
    """'head (2 tensors), target_backbone (152 tensors)': keys grouped by first name."""
    groups: dict[str, int] = {}
    for key in keys:
        groups[key.split(".")[0]] = groups.get(key.split(".")[0], 0) + 1
    return ", ".join(f"{g} ({n} tensor{'s' if n > 1 else ''})" for g, n in sorted(groups.items()))


def rename(state: dict[str, Any], rules: list[tuple[str, str]]) -> tuple[Part, list[str]]:
    """(renamed tensors, keys no rule matched): each key takes the first matching regex rule
    (re.fullmatch; the replacement may use groups)."""
    out: Part = {}
    unmatched = []
    for key, value in state.items():
        for pattern, replacement in rules:
            match = re.fullmatch(pattern, key)
            if match:
                out[match.expand(replacement)] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


class LayoutError(ValueError):
    """Tensors that do not form the expected ViT (the message names key and shapes)."""


def unwrap_state_dict(content: Any, wrappers: tuple[str, ...] = ("model", "state_dict")) -> Any:
    """The state dict inside a checkpoint: content[w] for the first wrapper key present
    (MAE saves {'model': ...}, mmengine and MAE-CT {'state_dict': ...}), without the
    'module.' prefix of DistributedDataParallel."""
    while isinstance(content, dict):
        inner = next((content[w] for w in wrappers if isinstance(content.get(w), dict)), None)
        if inner is None:
            break
        content = inner
    if not isinstance(content, dict):
        raise LayoutError(f"The checkpoint holds a {type(content).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in content.items()}


def _get(part: Part, key: str, what: str) -> np.ndarray:
    if key not in part:
        raise LayoutError(f"{what}: tensor {key!r} is missing (found {_preview(part)}).")
    return np.asarray(part[key], np.float32)


def _preview(part: Part) -> str:
    keys = sorted(part)
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} tensors)" if len(keys) > 8 else "")


def block_indices(part: Part, prefix: str = "blocks.") -> list[int]:
    """The N of every `prefix`N.* key, sorted; an error when they are not 0..depth-1."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.")
    found = sorted({int(m.group(1)) for k in part if (m := pattern.match(k))})
    if found != list(range(len(found))):
        raise LayoutError(f"Blocks {found} are not numbered 0..{len(found) - 1}.")
    return found


def _linear(part: Part, name: str, what: str, bias: bool = True) -> dict[str, np.ndarray]:
    out = {"kernel": _get(part, f"{name}.weight", what).T}
    if bias:
        out["bias"] = _get(part, f"{name}.bias", what)
    return out


def _norm(part: Part, name: str, what: str) -> dict[str, np.ndarray]:
    return {"scale": _get(part, f"{name}.weight", what), "bias": _get(part, f"{name}.bias", what)}


def _block(part: Part, prefix: str, num_heads: int, what: str) -> dict[str, Any]:
    qkv_w = _get(part, f"{prefix}attn.qkv.weight", what)
    width = qkv_w.shape[1]
    if qkv_w.shape != (3 * width, width) or width % num_heads:
        raise LayoutError(
            f"{what}: {prefix}attn.qkv.weight has shape {list(qkv_w.shape)}; a ViT block of "
            f"width {width} with {num_heads} heads needs [{3 * width}, {width}]."
        )
    head_dim = width // num_heads
    qkv_b = _get(part, f"{prefix}attn.qkv.bias", what)
    proj = _linear(part, f"{prefix}attn.proj", what)
    return {
        "norm1": _norm(part, f"{prefix}norm1", what),
        "attn": {
            "qkv": {
                "kernel": qkv_w.T.reshape(width, 3, num_heads, head_dim),
                "bias": qkv_b.reshape(3, num_heads, head_dim),
            },
            "proj": {
                "kernel": proj["kernel"].reshape(num_heads, head_dim, width),
                "bias": proj["bias"],
            },
        },
        "norm2": _norm(part, f"{prefix}norm2", what),
        "mlp": {
            "fc1": _linear(part, f"{prefix}mlp.fc1", what),
            "fc2": _linear(part, f"{prefix}mlp.fc2", what),
        },
    }


def _block_part(tree: dict[str, Any], prefix: str) -> Part:
    qkv, proj = tree["attn"]["qkv"], tree["attn"]["proj"]
    width = qkv["kernel"].shape[0]
    out = {
        f"{prefix}norm1.weight": tree["norm1"]["scale"],
        f"{prefix}norm1.bias": tree["norm1"]["bias"],
        f"{prefix}attn.qkv.weight": qkv["kernel"].reshape(width, -1).T,
        f"{prefix}attn.qkv.bias": qkv["bias"].reshape(-1),
        f"{prefix}attn.proj.weight": proj["kernel"].reshape(-1, width).T,
        f"{prefix}attn.proj.bias": proj["bias"],
        f"{prefix}norm2.weight": tree["norm2"]["scale"],
        f"{prefix}norm2.bias": tree["norm2"]["bias"],
    }
    for fc in ("fc1", "fc2"):
        out[f"{prefix}mlp.{fc}.weight"] = tree["mlp"][fc]["kernel"].T
        out[f"{prefix}mlp.{fc}.bias"] = tree["mlp"][fc]["bias"]
    return out


def encoder_params(part: Part, num_heads: int) -> dict[str, Any]:
    """This project's params['encoder'] (unrolled blocks) from an encoder part."""
    what = "encoder"
    conv = _get(part, "patch_embed.proj.weight", what)
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        raise LayoutError(
            f"encoder: patch_embed.proj.weight has shape {list(conv.shape)}; a patch "
            "embedding is a Conv2d weight [width, channels, patch, patch]."
        )
    tree: dict[str, Any] = {
        "embedding": {
            "kernel": conv.transpose(2, 3, 1, 0),
            "bias": _get(part, "patch_embed.proj.bias", what),
        },
        "cls": _get(part, "cls_token", what).reshape(1, 1, -1),
        "norm": _norm(part, "norm", what),
    }
    for i in block_indices(part):
        tree[f"block_{i}"] = _block(part, f"blocks.{i}.", num_heads, what)
    return tree


def encoder_part(tree: dict[str, Any]) -> Part:
    """The encoder part (without pos_embed) of this project's params['encoder']."""
    out = {
        "cls_token": tree["cls"],
        "patch_embed.proj.weight": tree["embedding"]["kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": tree["embedding"]["bias"],
        "norm.weight": tree["norm"]["scale"],
        "norm.bias": tree["norm"]["bias"],
    }
    for key, block in tree.items():
        if key.startswith("block_"):
            out.update(_block_part(block, f"blocks.{key[6:]}."))
    return out


def decoder_params(part: Part, num_heads: int, what: str) -> dict[str, Any]:
    """This project's decoder params (pixel or feature decoder) from a decoder part."""
    tree: dict[str, Any] = {
        "embed": _linear(part, "embed", what),
        "mask_token": _get(part, "mask_token", what).reshape(1, 1, -1),
        "norm": _norm(part, "norm", what),
        "pred": _linear(part, "pred", what),
    }
    for i in block_indices(part):
        tree[f"block_{i}"] = _block(part, f"blocks.{i}.", num_heads, what)
    return tree


def decoder_part(tree: dict[str, Any]) -> Part:
    """The decoder part (without pos_embed) of this project's decoder params."""
    out = {"mask_token": tree["mask_token"]}
    for name in ("embed", "pred"):
        out[f"{name}.weight"] = tree[name]["kernel"].T
        out[f"{name}.bias"] = tree[name]["bias"]
    out["norm.weight"] = tree["norm"]["scale"]
    out["norm.bias"] = tree["norm"]["bias"]
    for key, block in tree.items():
        if key.startswith("block_"):
            out.update(_block_part(block, f"blocks.{key[6:]}."))
    return out


def head_params(part: Part, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, batch_stats) of an MLPHead (cmae_jax.models.heads) from a head part."""
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for key in sorted({k.split(".")[0] for k in part}):
        if key.startswith("dense_"):
            params[key] = _linear(part, key, what, bias=f"{key}.bias" in part)
        elif key.startswith("bn_"):
            params[key] = _norm(part, key, what)
            stats[key] = {
                "mean": _get(part, f"{key}.running_mean", what),
                "var": _get(part, f"{key}.running_var", what),
            }
        else:
            raise LayoutError(f"{what}: unexpected tensor group {key!r}.")
    return params, stats
