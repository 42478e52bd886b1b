"""Tensor files of the PyTorch world read into NumPy, and written, without running pickled code.

`.safetensors` files need only the `safetensors` package. PyTorch files (`.pth`, `.pt`,
`.bin`, `.th`, `.ckpt`) need torch, imported here only, and are read with
`torch.load(weights_only=True)`: objects that are not tensors or plain containers (e.g. the
`argparse.Namespace` that the MAE code saves as 'args', mmengine's log buffers) come back
as inert `UnreadObject`s instead of being rebuilt by their own code.
"""

from __future__ import annotations

import io
import json
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".th", ".ckpt")
TORCH_INSTALL_HINT = (
    "reading a PyTorch file needs torch: pip install torch (CPU build: pip install torch "
    "--index-url https://download.pytorch.org/whl/cpu; never together with torchvision "
    "here), or convert the file to .safetensors where torch is installed"
)

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


class CheckpointFileError(ValueError):
    """A file that cannot be read as a checkpoint; the message names the file and the fix."""


class UnreadObject:
    """Stands in for a pickled object of another library (its code is never run)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def __setstate__(self, state: Any) -> None:
        del state


def is_tensor_file(path: str) -> bool:
    """Whether the file name has a suffix of a tensor file read here."""
    return str(path).endswith((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))


def read_tensor_file(path: str) -> Any:
    """The content of a `.safetensors` or PyTorch file: dicts and lists with np.ndarray
    leaves (floating tensors as float32), other values as stored."""
    if str(path).endswith(SAFETENSORS_SUFFIX):
        return _read_safetensors(path)
    if str(path).endswith(TORCH_SUFFIXES):
        return _read_torch(path)
    raise CheckpointFileError(
        f"{path}: not a checkpoint file name; give a {SAFETENSORS_SUFFIX} or PyTorch "
        f"({', '.join(TORCH_SUFFIXES)}) file, or a folder holding model.safetensors."
    )


def write_safetensors(
    tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None
) -> None:
    """Writes float32 tensors to a `.safetensors` file (metadata {'format': 'pt'} by default,
    which transformers and timm expect)."""
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    safetensors.numpy.save_file(arrays, path, metadata=metadata or {"format": "pt"})


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    data = epath.Path(path).read_bytes()  # local or gs://
    try:
        entries = safetensors.deserialize(data)
    except Exception as e:  # SafetensorError, or a bad header's own error
        raise CheckpointFileError(_safetensors_problem(path, data, e)) from None
    out = {}
    for name, entry in entries:
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointFileError(f"{path}: tensor {name} has dtype {entry['dtype']}.")
        array = np.frombuffer(entry["data"], dtype=dtype).reshape(entry["shape"])
        out[name] = _as_float32(array)
    return out


def _safetensors_problem(path: str, data: bytes, error: Exception) -> str:
    """Why `data` is no safetensors file: too short, a header that is not one, or cut off."""
    if len(data) < 8:
        return f"{path} is not a safetensors file (only {len(data)} bytes)."
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        if data[8:9] == b"{":
            return f"{path} is truncated: its header alone needs {header_size} bytes."
        return f"{path} is not a safetensors file (no JSON header at its start)."
    try:
        header = json.loads(data[8 : 8 + header_size])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError):
        return f"{path} is not a safetensors file (its header is no tensor table)."
    if 8 + header_size + end > len(data):
        return (
            f"{path} is truncated: its tensors need {8 + header_size + end} bytes, the file "
            f"has {len(data)} (an interrupted download?). Download it again."
        )
    return f"{path} is a damaged safetensors file: {error}"


def _read_torch(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointFileError(f"{path}: {TORCH_INSTALL_HINT}.") from None
    local = "://" not in str(path)
    # A cloud file (gs://) is read into memory; a local one is memory-mapped.
    source = path if local else io.BytesIO(epath.Path(path).read_bytes())
    with epath.Path(path).open("rb") as f:
        magic = f.read(4)
    zipped = magic == _ZIP_MAGIC
    if not zipped and not magic.startswith(_PICKLE_MAGIC):
        raise CheckpointFileError(
            f"{path} is not a PyTorch checkpoint (it starts with {magic!r}, neither a zip "
            "archive nor a pickle). Give the .pth/.bin/.safetensors file itself."
        )
    try:
        # Other libraries' objects (unknown to weights_only) load as inert stand-ins.
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(source) if zipped else []
        if not local:
            source.seek(0)
        with torch.serialization.safe_globals([(UnreadObject, name) for name in foreign]):
            mmap = zipped and local
            content = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # zip / unpickling errors of damaged files
        if zipped:
            raise CheckpointFileError(
                f"{path} is truncated or damaged (its zip archive cannot be read: an "
                f"interrupted download?). Download it again. ({str(e).splitlines()[0]})"
            ) from None
        raise CheckpointFileError(
            f"{path} cannot be read as a PyTorch checkpoint without running its code "
            f"(truncated, damaged or holding objects other than tensors): {e}"
        ) from None
    return _to_numpy(content, torch)


def _to_numpy(value: Any, torch: Any) -> Any:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v, torch) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_numpy(v, torch) for v in value]
    return value
