"""MRC maps and image stacks (via `mrcfile`), with checks that give one-line errors.

Arrays are `[z, y, x]` (volumes) and `[n, y, x]` (stacks), as in the file. Headers are read
permissively (some writers omit the map ID or the machine stamp) and then checked here: mode,
dimensions and, above all, that the file holds as many bytes as its header promises.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np
import torch
from mrcfile.dtypes import HEADER_DTYPE
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.io._common import atomic_path, pread_rows
from cryostoch.io.stack_writer import StackWriter as StackWriter  # public home: io.mrc

# MRC modes read here (MRC2014): 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16.
MODE_DTYPES: dict[int, np.dtype] = {
    0: np.dtype(np.int8),
    1: np.dtype(np.int16),
    2: np.dtype(np.float32),
    6: np.dtype(np.uint16),
    12: np.dtype(np.float16),
}
HEADER_BYTES = 1024
_STAT_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class MrcHeader:
    """What cryostoch needs from an MRC header, checked against the file size."""

    path: Path
    shape: tuple[int, int, int]  # (nz, ny, nx); a single 2-D image has nz = 1
    mode: int
    dtype: np.dtype  # with the file's byte order
    data_offset: int
    voxel_size_a: tuple[float, float, float]  # (x, y, z); 0 where the header has none
    space_group: int  # 0 marks an image stack in MRC2014
    file_size: int
    dmin: float
    dmax: float
    dmean: float
    rms: float
    origin_a: tuple[float, float, float] = (0.0, 0.0, 0.0)  # MRC2014 origin (x, y, z)
    start_index: tuple[int, int, int] = (0, 0, 0)  # nxstart, nystart, nzstart

    @property
    def pixel_size_a(self) -> float:
        """The x voxel size (0.0 when the header does not set one)."""
        return self.voxel_size_a[0]

    @property
    def is_stack(self) -> bool:
        """True for an image stack (space group 0, or a `.mrcs` name), False for a volume."""
        return self.space_group == 0 or self.path.suffix.lower() == ".mrcs"

    @property
    def data_bytes(self) -> int:
        nz, ny, nx = self.shape
        return nz * ny * nx * self.dtype.itemsize


def _parse_header(raw: bytes) -> np.recarray | None:
    """The header record in the file's byte order, or None if no byte order gives a known mode.

    The byte order comes from the machine stamp; when that is missing or contradicts the mode
    (files seen in the wild), the order in which the mode is valid is used, as mrcfile's
    permissive mode does.
    """
    header = np.frombuffer(raw, dtype=HEADER_DTYPE).reshape(()).view(np.recarray)
    try:
        first = mrcfile.utils.byte_order_from_machine_stamp(header.machst)
    except ValueError:
        first = "<"
    for order in (first, ">" if first == "<" else "<"):
        candidate = header.copy()
        candidate.dtype = candidate.dtype.newbyteorder(order)
        if int(candidate.mode) in MODE_DTYPES:
            return candidate
    return None


def read_header(path: str | os.PathLike[str]) -> MrcHeader:
    """Read and check an MRC header; InputError (naming the file) if it cannot be used.

    Only the 1024-byte main header is read (with mrcfile's header layout), so a corrupt
    extended-header size cannot trigger a huge read.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such MRC file")
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as err:
        raise InputError(path, f"cannot read the file ({err.strerror or err})") from None
    if len(raw) < HEADER_BYTES:
        raise InputError(
            path,
            f"truncated MRC: the file has {file_size} bytes, less than the "
            f"{HEADER_BYTES}-byte header",
        )
    header = _parse_header(raw)
    if header is None:
        names = ", ".join(f"{m} ({d.name})" for m, d in MODE_DTYPES.items())
        has_id = bytes(header_map_id(raw))[:3] == b"MAP"
        raise InputError(
            path,
            ("unsupported MRC mode" if has_id else "not an MRC file (no map ID, unknown mode)")
            + f"; supported modes: {names}",
        )
    mode = int(header.mode)
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise InputError(path, f"not a valid MRC file: dimensions nx={nx}, ny={ny}, nz={nz}")
    extended = int(header.nsymbt)
    if extended < 0:
        raise InputError(path, f"not a valid MRC file: extended header size {extended}")
    dtype = MODE_DTYPES[mode].newbyteorder(header.mode.dtype.byteorder)
    offset = HEADER_BYTES + extended
    expected = offset + nx * ny * nz * dtype.itemsize
    if file_size < expected:
        raise InputError(
            path,
            f"truncated MRC: header says {nz} x {ny} x {nx} values of mode {mode} "
            f"({dtype.name}), {expected} bytes in all, but the file has {file_size} bytes",
        )
    sampling = (int(header.mx), int(header.my), int(header.mz))
    cell = (float(header.cella.x), float(header.cella.y), float(header.cella.z))
    voxel = tuple(c / m if m > 0 else 0.0 for c, m in zip(cell, sampling, strict=True))
    return MrcHeader(
        path=path,
        shape=(nz, ny, nx),
        mode=mode,
        dtype=dtype,
        data_offset=offset,
        voxel_size_a=voxel,
        space_group=int(header.ispg),
        file_size=file_size,
        dmin=float(header.dmin),
        dmax=float(header.dmax),
        dmean=float(header.dmean),
        rms=float(header.rms),
        origin_a=(float(header.origin.x), float(header.origin.y), float(header.origin.z)),
        start_index=(int(header.nxstart), int(header.nystart), int(header.nzstart)),
    )


def header_map_id(raw: bytes) -> bytes:
    return np.frombuffer(raw, dtype=HEADER_DTYPE).reshape(())["map"].tobytes()


def _memmap(header: MrcHeader) -> np.memmap:
    return np.memmap(
        header.path, dtype=header.dtype, mode="r", offset=header.data_offset, shape=header.shape
    )


def read_map(path: str | os.PathLike[str]) -> tuple[Tensor, float]:
    """Read a volume: `(float32 tensor [z, y, x], voxel size in Angstrom)`.

    The voxel size is the header's x voxel size, 0.0 when the header does not set one.
    """
    header = read_header(path)
    data = _memmap(header)
    volume = torch.from_numpy(np.array(data, dtype=np.float32))
    del data
    return volume, header.pixel_size_a


def check_map(path: str | os.PathLike[str], volume: Tensor, *,
              allow_constant: bool = False) -> None:
    """InputError naming `path` unless `volume` is a cubic map (n^3, n >= 4) of finite values
    that is not constant (unless `allow_constant`: a mask of ones is fine, a map is not)."""
    shape = tuple(volume.shape)
    if len(shape) != 3 or len(set(shape)) != 1 or shape[0] < 4:
        raise InputError(path, f"not a cubic map: shape (z, y, x) = {shape}")
    finite = torch.isfinite(volume)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputError(path, f"{bad:,} of {volume.numel():,} voxels are NaN or infinite")
    if not allow_constant and float(volume.max()) == float(volume.min()):
        raise InputError(path, f"every voxel is {float(volume.max()):g}: the map holds no "
                         "structure")


def _as_numpy(array: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def write_map(
    path: str | os.PathLike[str],
    volume: Tensor | np.ndarray,
    voxel_size_a: float | tuple[float, float, float],
    *,
    origin_a: tuple[float, float, float] | None = None,
    start_index: tuple[int, int, int] | None = None,
) -> None:
    """Write a float32 volume `[z, y, x]` with its voxel size (one value, or `(x, y, z)`),
    atomically. `origin_a` (MRC2014 origin, Angstrom) and `start_index` (nxstart, nystart,
    nzstart) place the map as another file did (`MrcHeader`); both default to 0.

    The data go to a temporary file in the same folder which is renamed onto `path` only
    once complete.
    """
    data = np.ascontiguousarray(_as_numpy(volume), dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"write_map needs a 3-D volume [z, y, x], got shape {data.shape}")
    voxel = np.broadcast_to(np.asarray(voxel_size_a, dtype=np.float64), (3,))
    if not (np.isfinite(voxel).all() and (voxel > 0).all()):
        raise ValueError(f"voxel size must be positive, got {voxel_size_a}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_volume()
            mrc.voxel_size = (float(voxel[0]) if voxel[0] == voxel[1] == voxel[2]
                              else tuple(float(v) for v in voxel))
            if origin_a is not None:
                mrc.header.origin = tuple(float(v) for v in origin_a)
            if start_index is not None:
                mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = (
                    int(v) for v in start_index)
            mrc.update_header_stats()


class MrcStack:
    """A memory-mapped image stack `[n, y, x]` (a single 2-D image counts as n = 1).

    `read(indices)` copies the requested images out as float32, in the order given.
    """

    def __init__(self, header: MrcHeader):
        self.header = header
        self.path = header.path
        self._data: np.memmap | None = _memmap(header)
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())

    @property
    def data(self) -> np.memmap:
        if self._data is None:
            raise ValueError(f"{self.path}: stack is closed")
        return self._data

    @property
    def n_images(self) -> int:
        return self.header.shape[0]

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.header.shape[1], self.header.shape[2]

    @property
    def dtype(self) -> np.dtype:
        return self.header.dtype

    @property
    def pixel_size_a(self) -> float:
        return self.header.pixel_size_a

    def __len__(self) -> int:
        return self.n_images

    def read(self, indices: np.ndarray | list[int] | slice | None = None) -> np.ndarray:
        """Images at 0-based `indices` (all when None) as a new float32 array.

        Read with positional reads (`pread_rows`), not through the memory map `data`: pages
        of a map that a pass has touched stay in the process's resident set, so streaming a
        stack of N images through it shows an RSS that grows with N."""
        n = self.n_images
        if indices is None or isinstance(indices, slice):
            idx = np.arange(n, dtype=np.int64)[indices if indices is not None else slice(None)]
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(
                f"{self.path}: image index out of range 0..{n - 1}: "
                f"{idx[(idx < 0) | (idx >= n)][0]}"
            )
        raw = np.empty((idx.size, *self.image_shape), dtype=self.dtype)
        if self._file is None:
            raise ValueError(f"{self.path}: stack is closed")
        if pread_rows(self._file.fileno(), self.header.data_offset, idx, raw) != raw.nbytes:
            raise InputError(self.path, "the file ended while reading images (truncated "
                             "after it was opened?)")
        return raw.astype(np.float32)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._data is not None:
            mm = getattr(self._data, "_mmap", None)
            self._data = None
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a view is still alive; the GC will close it
                    pass

    def __enter__(self) -> MrcStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        ny, nx = self.image_shape
        return f"MrcStack({str(self.path)!r}, {self.n_images} x {ny} x {nx}, {self.dtype.name})"


def open_stack(path: str | os.PathLike[str]) -> MrcStack:
    """Open an MRC image stack memory-mapped (modes 0, 1, 2, 6 and 12 = float16)."""
    return MrcStack(read_header(path))


def data_statistics(header: MrcHeader) -> tuple[float, float, float, float]:
    """(min, max, mean, std) of the data, computed in bounded memory in float64."""
    data = _memmap(header)
    try:
        return _chunk_stats(data)
    finally:
        del data


def _chunk_stats(data: np.ndarray) -> tuple[float, float, float, float]:
    n = data.shape[0]
    per_image = max(1, int(np.prod(data.shape[1:])) * 8)
    step = max(1, _STAT_CHUNK_BYTES // per_image)
    lo, hi, total, total_sq = np.inf, -np.inf, 0.0, 0.0
    for start in range(0, n, step):
        block = np.asarray(data[start : start + step], dtype=np.float64)
        lo = min(lo, float(block.min()))
        hi = max(hi, float(block.max()))
        total += float(block.sum())
        total_sq += float(np.square(block).sum())
    count = float(data.size)
    mean = total / count
    return lo, hi, mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))

