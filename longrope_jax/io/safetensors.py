"""Read and write the safetensors format with numpy alone (no torch; bfloat16 through `ml_dtypes`).

Format: an 8-byte little-endian header length N, N bytes of JSON header, then one raw byte buffer.
The header maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets are
relative to the buffer) and may hold a `"__metadata__"` dict of strings.

We parse it ourselves because `safetensors.numpy` has no bfloat16, and because checking every header
field lets a truncated or corrupt file fail with a message naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the limit the reference implementation enforces


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupt or otherwise not what the format says."""


class TensorInfo:
    """Where one tensor lives in a file: dtype, shape and absolute byte range."""

    __slots__ = ("name", "dtype", "shape", "start", "end")

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], start: int, end: int):
        self.name, self.dtype, self.shape, self.start, self.end = name, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def dtype_name(dtype) -> str:
    """The safetensors name ("F32", "BF16", ...) of a numpy dtype."""
    dt = np.dtype(dtype)
    if dt not in DTYPE_NAMES:
        raise SafetensorsError(f"dtype {dt}: not storable in safetensors; expected one of {sorted(map(str, DTYPE_NAMES))}")
    return DTYPE_NAMES[dt]


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. `get(name)` returns a read-only numpy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata, self.tensors = _read_header(self.path)
        self._buffer = None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}")
        info = self.tensors[name]
        if self._buffer is None:
            # Memory-map so a multi-gigabyte shard costs only the pages we touch.
            self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = math.prod(info.shape)
        flat = np.frombuffer(self._buffer, dtype=info.dtype.newbyteorder("<"), count=count, offset=info.start)
        return flat.reshape(info.shape)


def _read_header(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """Parse and check the header against the file size; every failure names `path`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: safetensors file not found")
    size = path.stat().st_size
    if size < 8:
        raise SafetensorsError(f"{path}: file is {size} bytes; expected at least 8 (the header length)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(
                f"{path}: header length {n} does not fit the file ({size} bytes); the file is truncated or not safetensors"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is JSON {type(header).__name__}; expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: __metadata__ is {type(metadata).__name__}; expected an object of strings")
    data_start = 8 + n
    tensors = {name: _tensor_info(path, name, entry, data_start, size) for name, entry in header.items()}
    return metadata, tensors


def _tensor_info(path: Path, name: str, entry, data_start: int, file_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{where}: header entry is {type(entry).__name__}; expected an object")
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise SafetensorsError(f"{where}: dtype {entry.get('dtype')!r}; expected one of {sorted(DTYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise SafetensorsError(f"{where}: shape {shape!r}; expected a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsError(f"{where}: data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise SafetensorsError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes; shape {shape} x {entry['dtype']} needs {expected}"
        )
    if data_start + end > file_size:
        raise SafetensorsError(
            f"{where}: data ends at byte {data_start + end} but the file has {file_size} bytes; the file is truncated"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def write_file(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> numpy array, any dtype in DTYPES) in order, streaming one at a time."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, arr in tensors.items():
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the buffer starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in tensors.values():
            little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            f.write(np.ascontiguousarray(little).reshape(-1).view(np.uint8).data)
