"""--cache-dir: the preprocessed particles on disk, reused across runs, so that memory does not
grow with the number of particles.

What is cached, per particle: the normalised Fourier block inside the likelihood's cutoff
(`reconstruct`, `baseline`, `score` and the first search of `refine`: (2h+1) x (h+1) complex
values, 4 kB at box 64 and the default cutoff), and for `refine` the spectrum up to N/2 - 1
(about 1.6 N^2 complex64 values: 12 kB at box 64). Each array is one `.npy` file named by a
hash of everything that determines it, with a JSON record beside it that holds that key and
the small results of the pass (noise sigma, contrast sign, the background noise spectrum):

- the particle file and every image stack it uses (resolved path, size, modification time),
  the selected rows (class selection, half set);
- the working box, the cutoff, the particle radius, the oversampling and the dtype;
- the normalisation settings (--invert, the seed of the noise-sigma sample);
- CACHE_FORMAT_VERSION (raised whenever the preprocessing's numbers change).

A run whose key matches reads the file (no image is read again); otherwise it builds a new one
(a changed setting gets a file of its own, so runs that alternate settings both keep theirs).
A file that does not match its record (truncated, replaced) is logged and built again, never
used. Under torchrun rank 0 builds or checks the file while the others wait, then every rank
opens it: the folder must be one every process can read (a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cryostoch.engine.distributed import ONE_PROCESS, World
from cryostoch.errors import InputError
from cryostoch.io.cache import (
    DamagedCache,
    DiskRows,
    RowWriter,
    open_rows,
    read_sidecar,
    row_file,
    write_sidecar,
)
from cryostoch.io.dataset import ParticleDataset

log = logging.getLogger(__name__)

# Raise when the preprocessing's numbers change: old caches then stop matching.
CACHE_FORMAT_VERSION = 1


def _file_stamp(path: Path) -> list:
    """[resolved path, size in bytes, modification time in ns]: a file that changes in place
    changes its stamp (the size or the time)."""
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def source_fingerprint(dataset: ParticleDataset) -> dict:
    """What identifies a selection of particles: the particle file, every image stack it
    reads (stamped) and the selected rows (a hash)."""
    used = np.unique(dataset.stack_id)
    stacks = [_file_stamp(dataset.stacks[int(i)].path) for i in used if i >= 0]
    rows = hashlib.sha256(np.ascontiguousarray(dataset.rows).tobytes()).hexdigest()[:16]
    return {"particles": _file_stamp(dataset.source_path), "stacks": stacks,
            "rows": rows, "n": len(dataset)}


def cache_paths(folder: Path, kind: str, key: dict) -> tuple[Path, Path]:
    """(the .npy file, its JSON record) for an array of `kind` with this key."""
    text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return folder / f"{kind}-{digest}.npy", folder / f"{kind}-{digest}.json"


def _usable(data: Path, record: dict | None, key: dict, shape: tuple[int, ...],
            dtype: torch.dtype) -> DiskRows | None:
    """The cached rows if the record matches the key and the file its record; else None
    (saying why in the log when a file was there)."""
    if record is None or record.get("key") != json.loads(json.dumps(key)):
        if data.exists():
            log.warning("cache %s: no matching record beside it; building it again", data)
        return None
    try:
        return open_rows(data, shape[0], shape[1:], dtype)
    except DamagedCache as err:
        log.warning("cache %s: %s; building it again", data, err)
        return None


def _load_or_build(folder: Path, kind: str, key: dict, shape: tuple[int, ...],
                   dtype: torch.dtype, build: Callable[[RowWriter], dict]) -> tuple[str, dict]:
    """(path of the .npy, the record's results) after reusing or building the cache."""
    data, sidecar = cache_paths(folder, kind, key)
    record = read_sidecar(sidecar)
    rows = _usable(data, record, key, shape, dtype)
    if rows is not None:
        log.info("reusing the cache %s (%.1f MB, %d particles)", data, rows.nbytes / 1e6,
                 shape[0])
        return str(data), record["results"]
    sidecar.unlink(missing_ok=True)  # no record may describe a file being rebuilt
    row_kb = int(np.prod(shape[1:])) * torch.empty(0, dtype=dtype).element_size() / 1e3
    log.info("building the cache %s (%d particles x %.1f kB)", data, shape[0], row_kb)
    try:
        with row_file(data, shape[0], shape[1:], dtype) as writer:
            results = build(writer)
        write_sidecar(sidecar, {"format": CACHE_FORMAT_VERSION, "key": key,
                                "shape": list(shape), "dtype": str(dtype),
                                "results": results})
    except OSError as err:
        raise InputError(folder, f"cannot write the cache {data.name} "
                         f"({err.strerror or err})") from None
    return str(data), results


def cached_rows(folder: str | Path, kind: str, key: dict, shape: tuple[int, ...],
                dtype: torch.dtype, build: Callable[[RowWriter], dict],
                world: World = ONE_PROCESS) -> tuple[DiskRows, dict]:
    """Rows (shape) of `kind` from the cache in `folder`: reused when `key` matches, else
    built by `build(writer)` (which writes every row in order and returns the small results
    to keep in the record, JSON-able). Returns the rows and those results. Rank 0 of `world`
    builds; the others wait and then open the same file."""
    key = {"format": CACHE_FORMAT_VERSION, "kind": kind, **key}
    path, results = world.on_main(
        lambda: _load_or_build(Path(folder), kind, key, shape, dtype, build))
    try:
        rows = open_rows(Path(path), shape[0], shape[1:], dtype)
    except DamagedCache as err:  # only another rank, on a folder it does not share
        raise InputError(path, f"{err}: --cache-dir must be a folder every process reads "
                         "(a shared file system)") from None
    return rows, results


__all__ = ["CACHE_FORMAT_VERSION", "cache_paths", "cached_rows", "source_fingerprint"]
