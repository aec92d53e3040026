"""Helpers shared by the readers: atomic writes, path resolution, value checks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cryostoch.errors import InputError

# How many folders (the file's own and its ancestors) are searched for a relative path.
MAX_ANCESTORS = 6


def default_file_mode() -> int:
    """0o666 less the process umask: what open() would give a new file (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the folder of `path`; on success rename it onto `path`.

    On an exception the temporary file is removed and `path` is left untouched, so a crash
    never leaves a file that looks complete.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def search_folders(anchor_file: Path, project_root: str | os.PathLike[str] | None) -> list[Path]:
    """Folders against which relative paths in `anchor_file` are resolved, in order.

    With an explicit `project_root` only that folder; otherwise the file's folder and its
    ancestors (RELION and cryoSPARC write paths relative to the project directory, which is
    usually an ancestor of the metadata file).
    """
    if project_root is not None:
        return [Path(project_root).expanduser().resolve()]
    folders = []
    folder = anchor_file.resolve().parent
    for _ in range(MAX_ANCESTORS):
        folders.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    return folders


def check_finite(source: Path | str, name: str, values: np.ndarray) -> None:
    """InputError naming the column if any value is NaN or infinite."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            source,
            f"{name} is NaN or infinite for {int(bad.sum())} of {values.size} particles "
            f"(first at particle {first + 1})",
        )


def check_positive(source: Path | str, name: str, values: np.ndarray) -> None:
    """InputError naming the column if any value is not strictly positive (or not finite)."""
    check_finite(source, name, values)
    values = np.asarray(values, dtype=np.float64)
    bad = values <= 0
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            source,
            f"{name} must be positive but is {values[first]:g} for {int(bad.sum())} of "
            f"{values.size} particles (first at particle {first + 1})",
        )


def format_folders(paths: Sequence[Path], limit: int = MAX_ANCESTORS) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def pread_rows(fd: int, data_offset: int, rows: np.ndarray, out: np.ndarray) -> int:
    """Read rows `rows` (k,) of a C-order on-disk array whose data start at byte
    `data_offset` into `out` (k, ...), in the order given; returns how many bytes were read.

    One positional read per run of consecutive rows (a chunk is one read, k random rows at
    most k), in file order. Unlike reading through a memory map, the pages read are not left
    mapped into the process, so its resident set stays the size of `out` however much of the
    file a pass reads (the file stays in the page cache, shared and reclaimable).
    """
    if len(rows) == 0:
        return 0
    row_bytes = out[0].nbytes
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    in_order = out if bool((order[1:] > order[:-1]).all()) else np.empty_like(out)
    starts = np.flatnonzero(np.diff(ordered, prepend=ordered[0] - 2) != 1)
    stops = np.append(starts[1:], len(ordered))
    total = 0
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        buffer = memoryview(in_order[start:stop].reshape(-1).view(np.uint8))
        total += _pread_into(fd, buffer, data_offset + int(ordered[start]) * row_bytes)
    if in_order is not out:
        out[order] = in_order
    return total


def _pread_into(fd: int, buffer: memoryview, position: int) -> int:
    """Fill `buffer` from byte `position` of `fd` (a single read may return less, e.g. above
    2 GB on Linux); returns the bytes read, fewer only at the end of the file."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], position + done)
        if got == 0:
            break
        done += got
    return done
