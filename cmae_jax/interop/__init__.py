"""Published PyTorch checkpoints in, PyTorch checkpoints out.

Readers (one per family): official MAE and timm (`mae_timm`), HF transformers ViTMAE
(`hf_vitmae`), official CMAE (`cmae_official`), official MAE-CT (`maect_official`); all
produce the neutral layout of `torch_layout`, which `published` turns into this project's
parameter trees. Writers: `hf_vitmae.write_hf`, `mae_timm.write_timm`. Commands:
`python -m cmae_jax.interop.convert` and `python -m cmae_jax.interop.export`.
"""

from cmae_jax.interop.published import (
    ImportedCheckpoint,
    import_checkpoint,
    is_published_checkpoint,
    load_params,
    run_config,
    saved_structure,
)

__all__ = [
    "ImportedCheckpoint",
    "import_checkpoint",
    "is_published_checkpoint",
    "load_params",
    "run_config",
    "saved_structure",
]
