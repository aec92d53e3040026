"""The output folder of a run: refused, cleared or continued before any work, and outputs
that appear all at once at the end.

Promise: a `map.mrc` that exists is complete and belongs to the `config.json` beside it. So
a new run refuses a folder that holds another run's outputs (unless `overwrite`, which
removes them first, or `resume`, which continues that run), and `StagedOutputs` writes every
final output under a hidden temporary name and renames them only when all are written,
`map.mrc` last. A failed run leaves no empty folder it created.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryostoch.errors import InputError

CHECKPOINT_NAME = "checkpoint.pt"
CHIMERAX_SCRIPT = "open_in_chimerax.cxc"  # engine.viewer writes it
SNAPSHOT_FOLDER = "snapshots"
# What a run writes at its end (class_NN.mrc with classes); map.mrc is renamed last.
FINAL_OUTPUTS = ("map.mrc", "map_fullbox.mrc", "config.json", "metrics.csv", "poses.star",
                 "report.png", "report.html", CHIMERAX_SCRIPT, "half1.mrc", "half2.mrc",
                 "refine.json", "map_unsharpened.mrc", "mask.mrc", "fsc.csv", "fsc.png",
                 "guinier.png", "postprocess.json")
CLASS_MAP_PATTERN = "class_[0-9][0-9].mrc"
# Hidden temporaries: StagedOutputs' and those of the atomic single-file writers.
STAGED_PREFIX = ".partial-"
TEMPORARY_PATTERNS = (f"{STAGED_PREFIX}*", ".*.partial", f"{CHECKPOINT_NAME}.*.tmp")


def run_outputs(out: Path) -> list[Path]:
    """The files of a run (finished or interrupted) that are in `out`."""
    found = [out / name for name in (*FINAL_OUTPUTS, CHECKPOINT_NAME) if (out / name).exists()]
    found += sorted(out.glob(CLASS_MAP_PATTERN))
    snapshots = out / SNAPSHOT_FOLDER
    if snapshots.is_dir():
        found += sorted(snapshots.glob("map_*.mrc"))
    return found


def _temporaries(out: Path) -> list[Path]:
    folders = [out, out / SNAPSHOT_FOLDER]
    return [p for f in folders if f.is_dir() for pattern in TEMPORARY_PATTERNS
            for p in f.glob(pattern) if p.is_file()]


def open_run_folder(out: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Check and create the output folder before any work.

    InputError (naming the folder) when it is a file, cannot be written, or holds another
    run's outputs and neither `overwrite` nor `resume` is given. With `overwrite` those
    outputs are removed; leftovers of a killed run (hidden temporaries) always are.
    """
    if overwrite and resume:
        raise InputError("--overwrite", "cannot be combined with --resume (choose one)")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder (--out names the output folder)")
    existing = run_outputs(out) if out.is_dir() else []
    if existing and not (overwrite or resume):
        names = ", ".join(str(p.relative_to(out)) for p in existing[:4])
        more = f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        raise InputError(out, f"already holds a run ({names}{more}): use --overwrite to "
                         "replace it, --resume to continue it, or another --out")
    if resume and existing and not (out / CHECKPOINT_NAME).exists():
        raise InputError(out, "holds a run's outputs but no checkpoint.pt to resume from: use "
                         "--overwrite to start again, or another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _check_writable(out)
    except OSError as err:
        if created:
            remove_if_empty(out)
        raise InputError(out, f"cannot write in this folder ({err.strerror or err})") from None
    if overwrite:
        for path in existing:
            if path.is_dir():
                raise InputError(path, "is a folder where a run writes a file: remove it")
            path.unlink()
    for path in _temporaries(out):
        path.unlink(missing_ok=True)


def _check_writable(folder: Path) -> None:
    """OSError unless a file can be created in `folder` (os.access misjudges root, ACLs)."""
    fd, name = tempfile.mkstemp(prefix=STAGED_PREFIX, dir=folder)
    os.close(fd)
    os.unlink(name)


@contextlib.contextmanager
def removed_if_failed_and_empty(out: Path) -> Iterator[None]:
    """Around a run into `out`: if it fails and `out` did not exist before, remove the
    folder again when nothing is in it."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed:
            remove_if_empty(out)
        raise


def remove_if_empty(out: Path) -> None:
    """Remove `out` (and its snapshots folder) if nothing is in them: after a failed run."""
    with contextlib.suppress(OSError):
        (out / SNAPSHOT_FOLDER).rmdir()
    with contextlib.suppress(OSError):
        out.rmdir()


class StagedOutputs:
    """Final outputs written under hidden names, renamed together by `commit`.

    `path(name)` gives the temporary to write `out/name` to; `commit` renames them in the
    order asked for, so the caller asks for map.mrc last; `discard` removes them.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._pending: list[tuple[Path, Path]] = []

    def path(self, name: str) -> Path:
        # the suffix is kept: writers (matplotlib) choose the format from it
        tmp = self.out / f"{STAGED_PREFIX}{name}"
        self._pending.append((tmp, self.out / name))
        return tmp

    def commit(self) -> None:
        if self._pending:  # the last output (map.mrc) marks a finished set: none meanwhile
            self._pending[-1][1].unlink(missing_ok=True)
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending = []

    def discard(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


__all__ = ["CHECKPOINT_NAME", "CHIMERAX_SCRIPT", "FINAL_OUTPUTS", "StagedOutputs",
           "open_run_folder", "remove_if_empty", "removed_if_failed_and_empty", "run_outputs"]
