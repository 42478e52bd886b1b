"""`python -m cmae_jax.interop.convert --from=FILE --to=WORKDIR`: a published checkpoint
(MAE, timm, HF ViTMAE folder, CMAE, MAE-CT) as a workdir of this project.

WORKDIR gets checkpoints/0 (params and BatchNorm statistics, orbax), config.json (the
config a run with this model would have written) and import.json (what was loaded and
left out). Use it wherever a checkpoint is taken: --config.init (evaluation),
--config.init_from (CMAE/MAE pretraining), --config.stages.<stage>.init_from (MAE-CT).
Everything is read and checked before anything is written.
"""

from __future__ import annotations

import sys

from absl import app, flags
from etils import epath

from cmae_jax import checkpointing
from cmae_jax import workdir as workdir_files
from cmae_jax.interop import published

FLAGS = flags.FLAGS
flags.DEFINE_string("from", None, "A .pth/.bin/.th/.safetensors file or a model folder.")
flags.DEFINE_string("to", None, "The workdir to write (must not hold anything yet).")


def convert(source: str, workdir: str) -> published.ImportedCheckpoint:
    """Writes the workdir of the published checkpoint `source`; returns what was imported."""
    imported = published.import_checkpoint(source)
    target = epath.Path(workdir)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{workdir} is not empty; give a new folder to --to.")
    checkpointer = checkpointing.Checkpointer(workdir, keep=1, save_every_steps=1)
    state = {"params": imported.params, "batch_stats": imported.batch_stats}
    checkpointer.save(0, state, {"imported_from": source}, force=True)
    checkpointer.close()
    workdir_files.write_json(workdir, "config.json", published.config_of(imported))
    report = {
        "source": source,
        "format": imported.format,
        "architecture": imported.architecture.describe(),
        "loaded": list(imported.params),
        "left_out": imported.left_out,
        "notes": imported.notes,
    }
    workdir_files.write_json(workdir, "import.json", report)
    return imported


def main(argv: list[str]) -> None:
    """Converts, prints the report and how to use the workdir; exit 2 on bad input."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    source, workdir = FLAGS["from"].value, FLAGS.to
    try:
        imported = convert(source, workdir)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
    print(imported.report())
    print(f"Wrote {workdir}: use it as --config.init={workdir} or --config.init_from={workdir}.")


if __name__ == "__main__":
    flags.mark_flags_as_required(["from", "to"])
    app.run(main)
