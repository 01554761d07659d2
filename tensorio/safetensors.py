"""Reading and writing the safetensors format, the Hugging Face Hub's checkpoint file, in torch alone.

Layout: 8 bytes little-endian header length N, then N bytes of JSON
`{"__metadata__": {...}, name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}`,
then the raw little-endian tensor bytes; offsets count from the end of the header.

The writer lays a file out as the `safetensors` library does, byte for byte: tensors sorted by dtype (the
library's order, 8-byte types first) then by name, so that every tensor starts at a multiple of its item size;
the header padded with spaces to a multiple of 8 bytes, so that the data starts 8-byte aligned too.
"""
import json
import math
import mmap
import os

import torch

from .files import FileError, atomic_write

DTYPES = {  # in the order the library writes them
    "I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "I32": torch.int32, "BF16": torch.bfloat16,
    "F16": torch.float16, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def load_safetensors(path: str | os.PathLike, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor in the file, or those of `names` it holds, each in its own memory (the file is closed on
    return). The file is mapped, not read: tensors left out cost nothing."""
    advice = "delete it and download it again"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FileError(f"{path} is not a safetensors file ({size} bytes): {advice}")
        # A private copy-on-write map: tensors are copied straight from the file's pages.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        n = int.from_bytes(buf[:8], "little")
        if n > size - 8:
            raise FileError(f"{path} is truncated or not a safetensors file (a header of {n} bytes in a file of "
                            f"{size}): {advice}")
        try:
            header = json.loads(buf[8:8 + n])
        except ValueError as e:
            raise FileError(f"{path} has a corrupt safetensors header ({e}): {advice}") from None
        if not isinstance(header, dict):
            raise FileError(f"{path} has a safetensors header that is not a JSON object: {advice}")
        header.pop("__metadata__", None)
        data_start, data_size = 8 + n, size - 8 - n
        tensors = {}
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            if not _is_entry(info):
                raise FileError(f"{path}: the header entry of tensor {name} is not {{\"dtype\", \"shape\": [sizes], "
                                f"\"data_offsets\": [begin, end]}}: {advice}")
            dtype, shape, (begin, end) = DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            if dtype is None:
                raise FileError(f"{path}: tensor {name} has the unsupported dtype {info['dtype']}")
            if end > data_size:
                raise FileError(f"{path} is truncated: tensor {name} needs bytes up to {end} of the data, the file "
                                f"holds {data_size}: {advice}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise FileError(f"{path} is corrupt: tensor {name} of shape {shape} has {end - begin} bytes: {advice}")
            tensors[name] = _copy_tensor(buf, data_start + begin, end - begin, dtype, shape)
        return tensors
    finally:
        buf.close()


def _is_entry(info) -> bool:
    """A tensor's header entry as the format defines it: a dtype name, a shape of sizes, and 0 <= begin <= end."""
    def naturals(values):
        return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)
    return (isinstance(info, dict) and isinstance(info.get("dtype"), str) and naturals(info.get("shape"))
            and naturals(info.get("data_offsets")) and len(info["data_offsets"]) == 2
            and info["data_offsets"][0] <= info["data_offsets"][1])


def _copy_tensor(buf: mmap.mmap, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    view = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)  # no copy: the file's bytes
    return view.view(dtype).reshape(shape).clone()  # the view dies here, so the map can be closed


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device; copied to the CPU) and optional string `metadata`, atomically."""
    order = sorted(tensors, key=lambda name: (list(DTYPES).index(_dtype_name(name, tensors[name])), name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    data, offset = [], 0
    for name in order:
        t = tensors[name].detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        data.append(t)
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # JSON allows trailing spaces; the data starts 8-byte aligned
    with atomic_write(path) as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for t in data:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy())  # the bytes as they lie in memory (little-endian)


def _dtype_name(name: str, t: torch.Tensor) -> str:
    if t.dtype not in DTYPE_NAMES:
        raise ValueError(f"tensor {name} has the dtype {t.dtype}, which this writer does not store")
    return DTYPE_NAMES[t.dtype]
