"""A reader for the safetensors format, the Hugging Face Hub's checkpoint file, in torch alone.

Layout: 8 bytes little-endian header length N, then N bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes; offsets count from the end of the header.
"""
import json
import math
import mmap
import os

import torch

from .errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor in the file, each in its own memory (the file is closed on return)."""
    advice = "delete it and download it again"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise UserError(f"{path} is not a safetensors file ({size} bytes): {advice}")
        # A private copy-on-write map: tensors are copied straight from the file's pages.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        n = int.from_bytes(buf[:8], "little")
        if n > size - 8:
            raise UserError(f"{path} is truncated or not a safetensors file (a header of {n} bytes in a file of "
                            f"{size}): {advice}")
        try:
            header = json.loads(buf[8:8 + n])
        except ValueError as e:
            raise UserError(f"{path} has a corrupt safetensors header ({e}): {advice}") from None
        header.pop("__metadata__", None)
        data_start, data_size = 8 + n, size - 8 - n
        tensors = {}
        for name, info in header.items():
            dtype, shape, (begin, end) = DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            if dtype is None:
                raise UserError(f"{path}: tensor {name} has the unsupported dtype {info['dtype']}")
            if end > data_size:
                raise UserError(f"{path} is truncated: tensor {name} needs bytes up to {end} of the data, the file "
                                f"holds {data_size}: {advice}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise UserError(f"{path} is corrupt: tensor {name} of shape {shape} has {end - begin} bytes: {advice}")
            tensors[name] = _copy_tensor(buf, data_start + begin, end - begin, dtype, shape)
        return tensors
    finally:
        buf.close()


def _copy_tensor(buf: mmap.mmap, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    view = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)  # no copy: the file's bytes
    return view.view(dtype).reshape(shape).clone()  # the view dies here, so the map can be closed
