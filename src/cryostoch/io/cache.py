"""On-disk row arrays: per-particle arrays written once to a `.npy` file and read back by rows.

A run's preprocessed particles (Fourier blocks, spectra) can outgrow memory. `RowFileWriter`
streams them to a standard `.npy` file chunk by chunk (under a temporary name, renamed only
once complete, so a killed build never leaves a file that looks complete), and `DiskRows` reads
the rows a minibatch or chunk needs. Any `.npy` reader opens the files (`numpy.load(path,
mmap_mode="r")`).

Reads are positional (`os.preadv`), not through a memory map: pages of a map that a run has
touched count in its resident set size until the kernel reclaims them, so a pass over a map of
N particles would show an RSS that grows with N. Positional reads leave the file in the page
cache (shared, reclaimable) and the process holds only the rows it asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.io._common import atomic_path, pread_rows


class DamagedCache(Exception):
    """A cache file that exists but cannot be used (truncated, foreign, other shape); the
    message says why. The caller rebuilds it."""


def _to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)


class DiskRows:
    """Rows of an on-disk (n_file, *row_shape) `.npy` array, read on demand.

    `index` (n,) int64 says which file row each of this view's rows is (`subset` composes it,
    so views of views cost no reads). Indexing with an int tensor, an array or a slice gives a
    CPU tensor of those rows, in that order, as `Tensor.__getitem__` would; `shape`, `dtype`
    and `len` read as a tensor's, so code written for an in-memory (n, ...) tensor of rows
    works on either.
    """

    def __init__(self, path: Path, data_offset: int, file_rows: int,
                 row_shape: tuple[int, ...], dtype: torch.dtype,
                 index: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self._offset = data_offset
        self._file_rows = file_rows
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self._np_dtype = _to_numpy_dtype(dtype)
        self._row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self._np_dtype.itemsize
        self.index = np.arange(file_rows, dtype=np.int64) if index is None else index
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed with the last view)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.row_shape))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return len(self.index) * self._row_bytes

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, rows: np.ndarray | Tensor) -> DiskRows:
        """A view of some of these rows (no reads; shares the open file)."""
        view = object.__new__(DiskRows)
        view.__dict__.update(self.__dict__)
        view.index = self.index[_positions(rows, len(self.index))]
        return view

    def __getitem__(self, key) -> Tensor:
        return torch.from_numpy(self.read(self.index[_positions(key, len(self.index))]))

    def read(self, file_rows: np.ndarray) -> np.ndarray:
        """(len(file_rows), *row_shape) rows of the file, in the order given (`pread_rows`)."""
        out = np.empty((len(file_rows), *self.row_shape), dtype=self._np_dtype)
        if pread_rows(self._file.fileno(), self._offset, file_rows, out) != out.nbytes:
            raise InputError(self.path, "the cache file ends early (truncated while in use?)")
        return out


def _positions(key, n: int) -> np.ndarray:
    """(k,) int64 positions in 0..n-1 from a slice, an int/bool tensor or an array."""
    if isinstance(key, slice):
        return np.arange(n, dtype=np.int64)[key]
    if isinstance(key, Tensor):
        key = key.detach().cpu().numpy()
    idx = np.asarray(key)
    if idx.dtype == bool:
        return np.flatnonzero(idx)
    idx = idx.astype(np.int64, copy=False).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return np.where(idx < 0, idx + n, idx)


def open_rows(path: Path, n_rows: int, row_shape: Sequence[int],
              dtype: torch.dtype) -> DiskRows:
    """The `.npy` at `path` as DiskRows; DamagedCache (saying why) unless it holds exactly
    (n_rows, *row_shape) values of `dtype` in C order, every byte present."""
    expected = (n_rows, *row_shape)
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, fortran, np_dtype = read_header(handle)
            offset = handle.tell()
    except (OSError, ValueError) as err:
        raise DamagedCache(f"not a readable .npy file ({err})") from None
    if tuple(shape) != expected or fortran or np_dtype != _to_numpy_dtype(dtype):
        raise DamagedCache(f"holds {np_dtype} {tuple(shape)}, expected "
                           f"{_to_numpy_dtype(dtype)} {expected}")
    size = path.stat().st_size
    needed = offset + int(np.prod(expected, dtype=np.int64)) * np_dtype.itemsize
    if size != needed:
        raise DamagedCache(f"has {size} bytes, expected {needed} (truncated or overwritten)")
    return DiskRows(path, offset, n_rows, tuple(row_shape), dtype)


class RowWriter:
    """Appends rows to an open `.npy` file in order (see `row_file`)."""

    def __init__(self, handle, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._handle = handle
        self.row_shape = row_shape
        self.dtype = dtype
        self.written = 0

    def write(self, start: int, rows: Tensor) -> None:
        """Rows `start`.. of the array: (b, *row_shape), right after the last ones written."""
        if start != self.written or tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows {start}.. of shape {tuple(rows.shape)} after "
                             f"{self.written} rows of {self.row_shape}")
        self._handle.write(rows.detach().cpu().to(self.dtype).contiguous().numpy().tobytes())
        self.written += rows.shape[0]


@contextlib.contextmanager
def row_file(path: Path, n_rows: int, row_shape: Sequence[int],
             dtype: torch.dtype) -> Iterator[RowWriter]:
    """A RowWriter that streams an (n_rows, *row_shape) array to the `.npy` file `path` in
    row order, chunk by chunk (only the chunk being written is in memory). The file is built
    under a temporary name and appears at `path` only when the block ends with every row
    written; on an error or a short write, nothing appears."""
    row_shape = tuple(row_shape)
    header = {"descr": np.lib.format.dtype_to_descr(_to_numpy_dtype(dtype)),
              "fortran_order": False, "shape": (n_rows, *row_shape)}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, header)
        writer = RowWriter(handle, row_shape, dtype)
        yield writer
        if writer.written != n_rows:
            raise ValueError(f"{path}: {writer.written} of {n_rows} rows written")
        handle.flush()
        os.fsync(handle.fileno())


def read_sidecar(path: Path) -> dict | None:
    """The JSON beside a cache file, None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_sidecar(path: Path, record: dict) -> None:
    """Write the JSON record atomically (it is written last: its presence marks a complete
    cache)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def check_cache_dir(folder: str | os.PathLike[str]) -> Path:
    """The folder, created if needed; InputError (naming it) unless files can be written
    there."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(folder, f"--cache-dir is not a writable folder "
                         f"({err.strerror or err})") from None
    return folder
