"""Read-only, on-demand access to the 2-D arrays of an SAE weight file, one row or column at a
time (sae.py decides which array and which axis a suite uses).

Every reader answers ``keys()``, ``shape(key)``, ``floating(key)`` and ``row(key, i)`` /
``column(key, i)``, which return a fresh 1-D float32 array, ``rows(key, start, stop)`` /
``columns(key, start, stop)``, a fresh 2-D float32 block of them (the encoder read a chunk of
features at a time), and ``vector(key)``, a whole 1-D (or 0-D) array such as a bias or a
threshold; nothing loads a matrix whole:

- ``TorchArrays`` -- a ``.pt``/``.pth`` state dict, ``torch.load(mmap=True, weights_only=True)``
  (files in torch's legacy, non-zip format cannot be memory-mapped: loaded whole, with a warning);
- ``SafetensorsArrays`` -- ``safe_open`` slices, reopened for each read;
- ``NpzArrays`` -- a NumPy ``.npz`` (a zip of ``.npy`` members). ``np.load(mmap_mode=...)``
  does not memory-map inside an archive, so the member's zip local header and ``.npy`` header
  are parsed here: a member stored uncompressed (``ZIP_STORED``, what ``np.savez`` writes) is
  memory-mapped at its data offset (``np.memmap``) and one row/column is copied out. A
  compressed member (``np.savez_compressed``) cannot be seeked into: each read decompresses it
  from its start up to the requested row, streaming and keeping only that row (so memory stays
  small, but a read costs time proportional to the row's position, up to the whole member),
  and only the member's contiguous lines (rows of a C-order array) can be read that way.
"""

from __future__ import annotations

import logging
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy
from safetensors import safe_open

from vllm_steer.vectors.pt_format import safe_torch_load

logger = logging.getLogger(__name__)

_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"


class TorchArrays:
    """The tensors of a ``.pt``/``.pth`` state dict, memory-mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            state = safe_torch_load(self.path, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            logger.warning("%s: saved in torch's legacy format, which cannot be memory-mapped; loading it whole", path)
            state = safe_torch_load(self.path)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected an SAE state dict, got {type(state).__name__}")
        self._tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def floating(self, key: str) -> bool:
        return self._tensors[key].is_floating_point()

    def row(self, key: str, index: int) -> np.ndarray:
        return _float32(self._tensors[key][index])

    def column(self, key: str, index: int) -> np.ndarray:
        return _float32(self._tensors[key][:, index])

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return _float32(self._tensors[key][start:stop])

    def columns(self, key: str, start: int, stop: int) -> np.ndarray:
        return _float32(self._tensors[key][:, start:stop])

    def vector(self, key: str) -> np.ndarray:
        return _float32(_small(self, key, self._tensors[key]).reshape(-1))


class SafetensorsArrays:
    """The tensors of a ``.safetensors`` file; each read is one ``safe_open`` slice."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._info = {}
        with safe_open(str(self.path), framework="pt") as file:
            for key in file.keys():
                part = file.get_slice(key)
                self._info[key] = (tuple(part.get_shape()), part.get_dtype())

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def floating(self, key: str) -> bool:
        return self._info[key][1] in ("F16", "BF16", "F32", "F64")

    def row(self, key: str, index: int) -> np.ndarray:
        return self.rows(key, index, index + 1).reshape(-1)

    def column(self, key: str, index: int) -> np.ndarray:
        return self.columns(key, index, index + 1).reshape(-1)

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._read(key, (slice(start, stop),))

    def columns(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._read(key, (slice(None), slice(start, stop)))

    def vector(self, key: str) -> np.ndarray:
        _small(self, key, None)
        with safe_open(str(self.path), framework="pt") as file:
            return _float32(file.get_tensor(key).reshape(-1))

    def _read(self, key: str, where: tuple) -> np.ndarray:
        with safe_open(str(self.path), framework="pt") as file:
            part = file.get_slice(key)[where]
        return _float32(part)


@dataclass
class _Member:
    """One ``.npy`` member of an archive: its header and where its data starts (in the file
    for a stored member, in the decompressed member otherwise)."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int
    memmap: np.memmap | None = None

    @property
    def stored(self) -> bool:
        return self.info.compress_type == zipfile.ZIP_STORED


class NpzArrays:
    """The arrays of a NumPy ``.npz`` archive, read without loading a member whole (see the
    module docstring: stored members are memory-mapped, compressed ones streamed)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as archive:
            infos = archive.infolist()
        self._infos = {info.filename.removesuffix(".npy"): info for info in infos if info.filename.endswith(".npy")}
        self._members: dict[str, _Member] = {}

    def keys(self) -> list[str]:
        return list(self._infos)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._member(key).shape

    def floating(self, key: str) -> bool:
        return self._member(key).dtype.kind == "f"

    def compressed(self, key: str) -> bool:
        return not self._member(key).stored

    def row(self, key: str, index: int) -> np.ndarray:
        return self._lines(key, index, index + 1, column=False).reshape(-1)

    def column(self, key: str, index: int) -> np.ndarray:
        return self._lines(key, index, index + 1, column=True).reshape(-1)

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._lines(key, start, stop, column=False)

    def columns(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._lines(key, start, stop, column=True)

    def vector(self, key: str) -> np.ndarray:
        member = self._member(key)
        _small(self, key, None)
        with zipfile.ZipFile(self.path) as archive, archive.open(member.info) as stream:
            return np.asarray(npy.read_array(stream), dtype=np.float32).reshape(-1)

    def _member(self, key: str) -> _Member:
        member = self._members.get(key)
        if member is None:
            member = self._members[key] = self._read_header(self._infos[key])
        return member

    def _read_header(self, info: zipfile.ZipInfo) -> _Member:
        where = f"{self.path}[{info.filename!r}]"
        if info.flag_bits & 0x1:
            raise ValueError(f"{where}: encrypted archive members are not supported")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as file:
                file.seek(info.header_offset)
                signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(file.read(_ZIP_LOCAL_HEADER.size))
                if signature != _ZIP_LOCAL_SIGNATURE:
                    raise ValueError(f"{where}: not a zip local file header at offset {info.header_offset}")
                file.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length)
                shape, fortran, dtype = _npy_header(file, where)
                return _Member(info, shape, dtype, fortran, file.tell())
        with zipfile.ZipFile(self.path) as archive, archive.open(info) as stream:
            shape, fortran, dtype = _npy_header(stream, where)
            return _Member(info, shape, dtype, fortran, stream.tell())

    def _lines(self, key: str, start: int, stop: int, *, column: bool) -> np.ndarray:
        """Rows ``start:stop`` (``[n, shape[1]]``) or columns (``[shape[0], n]``), float32."""
        member = self._member(key)
        if len(member.shape) != 2:
            raise ValueError(f"{self.path}[{key!r}]: shape {list(member.shape)}; expected 2-D")
        if member.stored:
            if member.memmap is None:
                order = "F" if member.fortran else "C"
                member.memmap = np.memmap(
                    self.path, dtype=member.dtype, mode="r", offset=member.offset, shape=member.shape, order=order
                )
            part = member.memmap[:, start:stop] if column else member.memmap[start:stop]
            return np.array(part, dtype=np.float32)
        if column != member.fortran:  # rows of a C-order array and columns of a Fortran-order one are contiguous
            raise ValueError(
                f"{self.path}[{key!r}]: compressed, and its {'columns' if column else 'rows'} are not contiguous, "
                "so one cannot be read without decompressing all of it; re-save the archive with np.savez"
            )
        length = member.shape[0] if column else member.shape[1]
        size = length * member.dtype.itemsize
        with zipfile.ZipFile(self.path) as archive, archive.open(member.info) as stream:
            _skip(stream, member.offset + start * size)
            raw = stream.read(size * (stop - start))
        if len(raw) != size * (stop - start):
            raise ValueError(f"{self.path}[{key!r}]: truncated: line {stop - 1} is past the member's end")
        lines = np.frombuffer(raw, dtype=member.dtype).astype(np.float32).reshape(stop - start, length)
        return lines.T if column else lines


def _skip(stream, count: int, chunk: int = 1 << 20) -> None:
    """Decompress and discard ``count`` bytes in 1 MiB reads. ``ZipExtFile.seek`` reads 16 MiB at
    a time: buffers that size land on the heap once glibc has raised its mmap threshold, and
    stay in the process after they are freed."""
    while count > 0:
        read = len(stream.read(min(count, chunk)))
        if read == 0:
            return
        count -= read


def _npy_header(file, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy.read_magic(file)
    if version == (1, 0):
        shape, fortran, dtype = npy.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, fortran, dtype = npy.read_array_header_2_0(file)
    else:
        raise ValueError(f"{where}: .npy format version {version} is not supported")
    if dtype.hasobject:
        raise ValueError(f"{where}: holds pickled Python objects, which are never loaded")
    return tuple(shape), bool(fortran), dtype


def _small(arrays, key: str, value):
    """``value``, checked to be a 1-D or 0-D array (``vector`` reads it whole)."""
    shape = arrays.shape(key)
    if len(shape) > 1:
        raise ValueError(f"{arrays.path}[{key!r}]: shape {list(shape)}; expected a vector or a number")
    return value


def _float32(part: torch.Tensor) -> np.ndarray:
    """A fresh float32 copy of a (possibly memory-mapped, strided, bf16) tensor slice."""
    out = torch.empty(part.shape, dtype=torch.float32)
    out.copy_(part)
    return out.numpy()
