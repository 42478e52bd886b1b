"""`python -m cmae_jax.interop.export --init=WORKDIR --format=hf|timm --out=DIR`: an
encoder of this project for PyTorch users.

--format=hf writes config.json, model.safetensors and preprocessor_config.json, loadable
by transformers' ViTMAEForPreTraining.from_pretrained(DIR) (encoder + pixel decoder) and
ViTMAEModel.from_pretrained(DIR); a run without a pixel decoder (MAE-CT after stage 1)
gives a ViTMAEModel folder. --format=timm writes DIR/model.safetensors with timm's
VisionTransformer keys (the encoder) and a timm config.json. WORKDIR is any run of this
project (for MAE-CT the encoder its evaluation uses: the last stage's) or a published
checkpoint, which makes this a converter between the PyTorch formats too.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags

from cmae_jax import checkpointing, weights
from cmae_jax.interop import hf_vitmae, mae_timm, published
from cmae_jax.interop.architecture import architecture_of

FORMATS = ("hf", "timm")
FLAGS = flags.FLAGS
flags.DEFINE_string("init", None, "A workdir of this project (or a published checkpoint).")
flags.DEFINE_enum("format", "hf", FORMATS, "hf: transformers ViTMAE folder; timm: timm keys.")
flags.DEFINE_string("out", None, "The folder to write.")


def _params(init: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """params[key] (NumPy, unrolled blocks) for the `keys` the checkpoint at `init` has."""
    if published.is_published_checkpoint(init):
        imported = published.import_checkpoint(init).params
        return {k: imported[k] for k in keys if k in imported}
    state_dir = weights.find_checkpoint(init)
    saved = checkpointing.saved_structure(state_dir)["params"]
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu)
    item = {"params": {k: jax.tree.map(abstract, saved[k]) for k in keys if k in saved}}
    restored = checkpointing.restore_parts(state_dir, item)["params"]
    return {k: published.unstack_blocks(jax.tree.map(np.asarray, v)) for k, v in restored.items()}


def export(init: str, format_name: str, out: str) -> list[str]:
    """Writes the export of the checkpoint at `init` to `out`; returns the files written."""
    if format_name not in FORMATS:
        raise ValueError(f"--format={format_name!r}: use one of {', '.join(FORMATS)}.")
    config = weights.run_config_json(init)
    if config is None:
        raise FileNotFoundError(f"{init}: the run's config.json is missing; it is needed.")
    keys = ("encoder", "pixel_decoder") if format_name == "hf" else ("encoder",)
    params = _params(init, keys)
    inp = config["input"]
    architecture = architecture_of(params, int(inp["image_size"]))
    normalization = (tuple(inp["mean"]), tuple(inp["std"]))
    if format_name == "timm":
        crop = float(inp.get("eval_crop_fraction", 1.0))
        return mae_timm.write_timm(params["encoder"], architecture, normalization, crop, out)
    return hf_vitmae.write_hf(
        params["encoder"],
        params.get("pixel_decoder"),
        architecture,
        normalization,
        mask_ratio=float(inp.get("mask_ratio", 0.75)),
        norm_pix_loss=bool(config.get("loss", {}).get("norm_pix", True)),
        folder=out,
    )


def main(argv: list[str]) -> None:
    """Exports and lists the files written; exit 2 on bad input."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        files = export(FLAGS.init, FLAGS.format, FLAGS.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
    print("Wrote " + ", ".join(files))


if __name__ == "__main__":
    flags.mark_flags_as_required(["init", "out"])
    app.run(main)
