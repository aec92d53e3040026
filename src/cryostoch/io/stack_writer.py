"""A streaming MRC stack writer whose memory does not grow with the stack.

Writing through a memory map would keep every written page resident (file-backed RSS) and a
closing statistics pass would read the whole stack back: 3.3 GB of RSS for 50,000 x 128 x 128
float32 images. This writer uses plain file writes and running statistics, so the process holds
one chunk at a time. The file appears at its path only when every image has been written (a
temporary file in the target folder, renamed on success, deleted on error). The header is
made by `mrcfile` (image stack, voxel size, mode 2 or 12).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
import torch
from torch import Tensor

from cryostoch.io._common import default_file_mode

_MODES = {np.dtype(np.float32): 2, np.dtype(np.float16): 12}


class StackWriter:
    """Write an image stack (n, box, box) in chunks; appears at `path` only when complete."""

    def __init__(self, path: str | os.PathLike[str], n_images: int, box: int,
                 dtype: object = np.float32, pixel_size_a: float = 1.0):
        if n_images <= 0 or box <= 0:
            raise ValueError(f"need n_images > 0 and box > 0, got {n_images}, {box}")
        if not (np.isfinite(pixel_size_a) and pixel_size_a > 0):
            raise ValueError(f"pixel size must be positive, got {pixel_size_a}")
        if isinstance(dtype, torch.dtype):
            dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype, dtype)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _MODES:
            raise ValueError(f"writes float16 or float32, not {dtype!r}")
        self.path = Path(path)
        self.n_images = int(n_images)
        self.box = int(box)
        self.pixel_size_a = float(pixel_size_a)
        self._tmp: Path | None = None
        self._file = None
        self._header: np.recarray | None = None
        self._offset = 0
        self._written: np.ndarray | None = None
        self._stats = [np.inf, -np.inf, 0.0, 0.0]  # min, max, sum, sum of squares

    def open(self) -> StackWriter:
        if self._file is not None:
            raise ValueError(f"{self.path}: writer already open")
        folder = self.path.parent if str(self.path.parent) else Path(".")
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=folder)
        os.close(fd)
        self._tmp = Path(name)
        try:
            # mrcfile makes the header and a sparse data block of the right size
            mrc = mrcfile.new_mmap(self._tmp, (self.n_images, self.box, self.box),
                                   mrc_mode=_MODES[self.dtype], overwrite=True)
            try:
                mrc.set_image_stack()
                mrc.voxel_size = (self.pixel_size_a, self.pixel_size_a, 1.0)
                self._header = mrc.header.copy()
                self._offset = mrc.header.nbytes + int(mrc.header.nsymbt)
                self._file_dtype = mrc.data.dtype  # with the file's byte order
            finally:
                mrc.close()
            self._file = open(self._tmp, "r+b")  # noqa: SIM115 - closed in close()/abort()
        except BaseException:
            self.abort()
            raise
        self._written = np.zeros(self.n_images, dtype=bool)
        return self

    def write(self, start_index: int, images: Tensor | np.ndarray) -> None:
        """Store `images` (k, box, box) at 0-based positions start_index .. start_index + k - 1."""
        if self._file is None:
            raise ValueError(f"{self.path}: writer is not open")
        if isinstance(images, Tensor):
            images = images.detach().cpu().numpy()
        data = np.asarray(images)
        if data.ndim == 2:
            data = data[None]
        k = data.shape[0]
        if data.shape[1:] != (self.box, self.box):
            raise ValueError(f"images must be (k, {self.box}, {self.box}), got {data.shape}")
        if start_index < 0 or start_index + k > self.n_images:
            raise ValueError(
                f"images {start_index}..{start_index + k - 1} outside the stack of {self.n_images}"
            )
        out = np.ascontiguousarray(data, dtype=self._file_dtype)
        stored = out.astype(np.float64)  # statistics of the values as stored
        self._stats[0] = min(self._stats[0], float(stored.min()))
        self._stats[1] = max(self._stats[1], float(stored.max()))
        self._stats[2] += float(stored.sum())
        self._stats[3] += float(np.square(stored).sum())
        del stored
        self._file.seek(self._offset + start_index * self.box * self.box * out.itemsize)
        self._file.write(out.tobytes())
        self._written[start_index : start_index + k] = True

    def close(self) -> None:
        """Finish the header and rename the file into place; ValueError if images are missing
        (the partial file is then discarded)."""
        if self._file is None:
            return
        missing = np.flatnonzero(~self._written)
        if missing.size:
            self.abort()
            raise ValueError(
                f"{self.path}: {missing.size} of {self.n_images} images were never written "
                f"(first: {int(missing[0])}); the stack was discarded"
            )
        try:
            lo, hi, total, total_sq = self._stats
            count = float(self.n_images) * self.box * self.box
            mean = total / count
            header = self._header
            header.dmin, header.dmax, header.dmean = lo, hi, mean
            header.rms = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
            self._file.seek(0)
            self._file.write(header.tobytes())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.chmod(self._tmp, default_file_mode())  # mkstemp made it 0600
            os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the partial stack."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> StackWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
