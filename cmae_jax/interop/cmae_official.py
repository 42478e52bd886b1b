"""Official CMAE checkpoints (ZhichengHuang/CMAE, mmengine): everything this project's CMAE has.

Layout, from the code that writes it (mmengine saves {'meta', 'state_dict', 'optimizer',
...}; the released fine-tuning configs load the pretraining file without a prefix, as
tools/extract_backbone_weights.py writes the backbone alone):
  cmae/models/algorithms/cmae.py, CMAE: backbone (online encoder), target_backbone
  (momentum encoder, final_norm=False), pixel_decoder, feature_decoder, projector,
  target_projector (momentum), head.predictor.
  cmae/models/backbones/vision_transformer.py + transformer_utils.py (mmcv names):
  cls_token, pos_embed, patch_embed.projection, layers.N.{ln1, attn.qkv, attn.proj, ln2,
  ffn.layers.0.0 (fc1), ffn.layers.1 (fc2)}, ln1 (final norm); fine-tuned
  (mim_cls_vit.py, final_norm=False): fc_norm, and head.fc_cls.
  cmae/models/necks/mae_neck.py, MAEPretrainDecoder: decoder_embed, mask_token,
  decoder_pos_embed, decoder_blocks.N.* (mmcv names), ln1 (decoder norm), decoder_pred.
  cmae/models/necks/nonlinear_neck.py, NonLinearNeck(num_layers=2, with_bias=True,
  with_last_bn=False): fc0, bn0 (BatchNorm), fc1 (no bias).
Its position tables are row first (see positions.py); the import reorders channels.
"""

from __future__ import annotations

from typing import Any

from cmae_jax.interop.torch_layout import (
    LayoutError,
    TorchCheckpoint,
    rename,
    summarize,
    unwrap_state_dict,
)

FORMAT = "official CMAE (mmengine)"
# Marks a state dict (or its backbone) as the mmcv-named ViT of the CMAE code.
SIGNATURE = "patch_embed.projection.weight"

_BLOCK = r"(?:layers|decoder_blocks)\.(\d+)\."
_BLOCK_RULES = [
    (rf"{_BLOCK}ln1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (rf"{_BLOCK}ln2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (rf"{_BLOCK}attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (rf"{_BLOCK}ffn\.layers\.0\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (rf"{_BLOCK}ffn\.layers\.1\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
]
ENCODER_RULES = [
    (r"(cls_token|pos_embed)", r"\1"),
    (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:ln1|fc_norm)\.(weight|bias)", r"norm.\1"),
    *_BLOCK_RULES,
]
DECODER_RULES = [
    (r"decoder_embed\.(weight|bias)", r"embed.\1"),
    (r"mask_token", "mask_token"),
    (r"decoder_pos_embed", "pos_embed"),
    (r"ln1\.(weight|bias)", r"norm.\1"),
    (r"decoder_pred\.(weight|bias)", r"pred.\1"),
    *_BLOCK_RULES,
]
HEAD_RULES = [
    (r"fc(\d+)\.(weight|bias)", r"dense_\1.\2"),
    (r"bn(\d+)\.(weight|bias|running_mean|running_var)", r"bn_\1.\2"),
    (r"bn\d+\.num_batches_tracked", "num_batches_tracked"),
]
# (prefix in the file, part here, rules)
SUBMODELS = (
    ("backbone.", "encoder", ENCODER_RULES),
    ("pixel_decoder.", "pixel_decoder", DECODER_RULES),
    ("feature_decoder.", "feature_decoder", DECODER_RULES),
    ("projector.", "projector", HEAD_RULES),
    ("head.predictor.", "predictor", HEAD_RULES),
)


def _submodel(state: dict[str, Any], rules: list[tuple[str, str]], what: str) -> dict[str, Any]:
    part, unmatched = rename(state, rules)
    part.pop("num_batches_tracked", None)
    if unmatched:
        raise LayoutError(
            f"{what}: tensors {unmatched[:4]} are not part of this project's model (layer "
            "scale gamma_1/gamma_2, or another architecture)."
        )
    return part


def read_cmae(content: Any) -> TorchCheckpoint:
    """A CMAE pretraining checkpoint (all parts), its extracted backbone, or a fine-tuned one."""
    state = unwrap_state_dict(content)
    checkpoint = TorchCheckpoint(format=FORMAT, method="cmae", parts={})
    if not any(k.startswith("backbone.") for k in state):  # extract_backbone_weights.py
        state = {f"backbone.{k}": v for k, v in state.items()}
    rest = dict(state)
    for prefix, name, rules in SUBMODELS:
        inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        for key in inside:
            del rest[prefix + key]
        if name == "encoder" and "fc_norm.weight" in inside:
            checkpoint.fine_tuned = True
            checkpoint.notes.append(
                "fine-tuned with global pooling: its fc_norm (applied after pooling there) "
                "is loaded as the encoder's final LayerNorm (applied to every token here)"
            )
        if inside:
            checkpoint.parts[name] = _submodel(inside, rules, f"{FORMAT} {prefix[:-1]}")
    if "projector" in checkpoint.parts:
        checkpoint.notes.append(
            "the heads' BatchNorm eps is 1e-6 in the CMAE code (NonLinearNeck), 1e-5 here"
        )
    if "pixel_decoder" not in checkpoint.parts:
        checkpoint.left_out.append("decoders and heads absent: encoder-only checkpoint")
        checkpoint.method = "mae"
    momentum = [k for k in rest if k.startswith(("target_backbone.", "target_projector."))]
    if momentum:
        checkpoint.left_out.append(
            "the momentum (EMA) encoder and projector: a new run's EMA target starts as a "
            "copy of the online weights (a fresh optimiser)"
        )
    others = [k for k in rest if k not in momentum]
    if any(k.startswith("head.") for k in others):
        checkpoint.fine_tuned = True
    if others:
        checkpoint.left_out.append(f"not part of the model here: {summarize(others)}")
    return checkpoint
