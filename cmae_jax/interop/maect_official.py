"""Official MAE-CT checkpoints (ml-jku/MAE-CT): released encoders and stage checkpoints.

Layouts, from the code that writes them:
  loggers/writers/checkpoint_writer.py saves each sub-model of a stage on its own as
  '<model>.<sub> cp=<checkpoint> model.th' = {'state_dict', 'ctor_kwargs'}, e.g.
  'mae_contheads_vit.encoder cp=last model.th', '... .decoder ...', '... .head.nnclr ...';
  save_mode 'single' writes '<checkpoint>.th' = {'model': {'encoder': ..., 'decoder':
  ..., 'head.nnclr': ...}, 'model_ctor_kwargs': ...}. loggers/ema_logger.py writes
  '<model>.encoder cp=<checkpoint> ema=<factor> model.th', a bare state dict. The released
  encoders (maect_base16.th, ...) are read by eval_probe.py as a state dict, possibly under
  'state_dict'.
  models/vit/vit_mae.py, VitMae (timm blocks, models/modules/vit_block.py): cls_token,
  pos_embed [1, N, D] (fixed sin-cos, MAE's order, no cls slot; older files have one),
  patch_embed.proj, blocks.N.*, norm; ctor_kwargs['attention_heads'].
  models/vit/masked_decoder.py, MaskedDecoder: embed, mask_token, pos_embed, blocks.N.*,
  norm, pred.
  models/contrastive_heads/base/contrastive_head_base.py (NNCLR): projector = Sequential(
  Linear(no bias), BN, ReLU, Linear(no bias), BN, ReLU, Linear(no bias), BN), predictor =
  Sequential(Linear(no bias), BN, ReLU, Linear(no bias)); nnclr_ema_queue_head.py adds
  target_projector (EMA) and the queue buffers.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from cmae_jax.interop import mae_timm, state_dicts
from cmae_jax.interop.torch_layout import (
    LayoutError,
    TorchCheckpoint,
    rename,
    summarize,
    unwrap_state_dict,
)

FORMAT = "official MAE-CT"
STAGE_FILE = re.compile(r"(?P<model>.+)\.encoder cp=(?P<cp>\S+)(?: ema=\S+)? model\.th")
DECODER_RULES = [
    (r"(embed|norm|pred)\.(weight|bias)", r"\1.\2"),
    (r"(mask_token|pos_embed)", r"\1"),
    (rf"blocks\.(\d+)\.{mae_timm.BLOCK}", r"blocks.\1.\2.\3"),
]
# The Sequential layers of the NNCLR heads: index -> name here.
PROJECTOR_LAYERS = {0: "dense_0", 1: "bn_0", 3: "dense_1", 4: "bn_1", 6: "dense_2", 7: "bn_2"}
PREDICTOR_LAYERS = {0: "dense_0", 1: "bn_0", 3: "dense_1"}


def _single_save(content: dict[str, Any]) -> bool:
    """Whether `content` is a 'single' stage checkpoint: {'model': {'encoder': ..., ...}}."""
    model = content.get("model")
    return isinstance(model, dict) and isinstance(model.get("encoder"), dict)


def is_maect(content: Any, path: str) -> bool:
    """Whether a timm-keyed file is MAE-CT's: its stage-file name, its ctor_kwargs, its
    'single' save layout, or a position table without a cls slot."""
    if STAGE_FILE.fullmatch(os.path.basename(path)):
        return True
    if not isinstance(content, dict):
        return False
    if "ctor_kwargs" in content or _single_save(content):
        return True
    pos = unwrap_state_dict(content).get("pos_embed")
    if pos is None:
        return False
    length = int(np.prod(pos.shape[:-1]))
    return round(length**0.5) ** 2 == length


def _head(state: dict[str, Any], prefix: str, layers: dict[int, str]) -> dict[str, Any]:
    rules = [
        (rf"{prefix}\.{i}\.(weight|bias|running_mean|running_var)", rf"{name}.\1")
        for i, name in layers.items()
    ]
    rules.append((rf"{prefix}\.\d+\.num_batches_tracked", "num_batches_tracked"))
    part, unmatched = rename({k: v for k, v in state.items() if k.startswith(prefix)}, rules)
    part.pop("num_batches_tracked", None)
    if unmatched:
        raise LayoutError(f"{FORMAT} head: unexpected tensors {unmatched[:4]}.")
    return part


def _sibling_files(path: str) -> dict[str, Any]:
    """{'decoder': content, 'head.<name>': content} of the other files of the same stage
    checkpoint as the encoder file `path` (those that exist)."""
    match = STAGE_FILE.fullmatch(os.path.basename(path))
    if match is None:
        return {}
    folder = os.path.dirname(path) or "."
    model, cp = match.group("model"), match.group("cp")
    sibling = re.compile(rf"{re.escape(model)}\.(decoder|head\.\S+) cp={re.escape(cp)} model\.th")
    found = {}
    for name in sorted(os.listdir(folder)):
        sub = sibling.fullmatch(name)
        if sub:
            found[sub.group(1)] = state_dicts.read_tensor_file(os.path.join(folder, name))
    return found


def read_maect(content: Any, path: str) -> TorchCheckpoint:
    """A MAE-CT encoder (released or a stage's, with its stage's decoder and NNCLR head
    files beside it when present) or a 'single' stage checkpoint."""
    checkpoint = TorchCheckpoint(format=FORMAT, method="maect", parts={})
    if _single_save(content):
        files = dict(content["model"])
        kwargs = content.get("model_ctor_kwargs") or {}
        encoder_kwargs = kwargs.get("encoder", {}) if isinstance(kwargs, dict) else {}
        encoder_file = {"state_dict": files.pop("encoder"), "ctor_kwargs": encoder_kwargs}
    else:
        encoder_file, files = content, _sibling_files(path)
    kwargs = encoder_file.get("ctor_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("attention_heads"):
        checkpoint.num_heads = int(kwargs["attention_heads"])
    rest = mae_timm.split_encoder(unwrap_state_dict(encoder_file), checkpoint)
    if rest:
        checkpoint.left_out.append(f"not part of the encoder here: {summarize(rest)}")
    if "decoder" in files:
        decoder_file = files.pop("decoder")
        decoder_kwargs = decoder_file.get("ctor_kwargs") if isinstance(decoder_file, dict) else None
        if isinstance(decoder_kwargs, dict) and decoder_kwargs.get("attention_heads"):
            checkpoint.decoder_heads = int(decoder_kwargs["attention_heads"])
        decoder, unmatched = rename(unwrap_state_dict(decoder_file), DECODER_RULES)
        if unmatched:
            raise LayoutError(f"{FORMAT} decoder: unexpected tensors {unmatched[:4]}.")
        checkpoint.parts["pixel_decoder"] = decoder
    heads = [name for name in files if name.startswith("head.")]
    if heads:
        state = unwrap_state_dict(files[heads[0]])
        for name, layers in (("projector", PROJECTOR_LAYERS), ("predictor", PREDICTOR_LAYERS)):
            checkpoint.parts[name] = _head(state, name, layers)
        extra = [k for k in state if not k.startswith(("projector.", "predictor."))]
        if extra:
            checkpoint.left_out.append(
                f"{heads[0]}: {summarize(extra)} (EMA projector and queue: a new stage "
                "starts them afresh)"
            )
        if len(heads) > 1:
            checkpoint.left_out.append(f"other heads: {', '.join(heads[1:])}")
    if not heads and "pixel_decoder" not in checkpoint.parts:
        checkpoint.left_out.append("decoder and heads absent: encoder-only checkpoint")
    return checkpoint
