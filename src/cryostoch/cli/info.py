"""Describe a STAR, cryoSPARC .cs or MRC file.

For particle files (.star, .cs): particle count, box, pixel size, optics groups, defocus and
astigmatism ranges, whether poses are present, and the image stacks (found or missing).
For MRC maps and stacks (.mrc, .mrcs, .map): shape, mode, voxel size and value statistics.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from cryostoch.errors import InputError
from cryostoch.io.dataset import ParticleDataset, read_particle_table
from cryostoch.io.mrc import MODE_DTYPES, data_statistics, read_header
from cryostoch.io.records import ParticleTable
from cryostoch.operators.ctf import at_nyquist, box_limits

PARTICLE_SUFFIXES = (".star", ".cs")
MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".st", ".rec")
_KINDS = {"star": "RELION STAR", "cs": "cryoSPARC .cs", "mrc": "MRC stack"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", type=Path, help="a .star, .cs, .mrc or .mrcs file")
    parser.add_argument(
        "--project-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder that relative image paths start from (default: the file's folder and "
        "its ancestors)",
    )


def run(args: argparse.Namespace) -> int:
    path: Path = args.path
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder: give a .star, .cs, .mrc or .mrcs file in it")
    unusable = None
    if suffix in PARTICLE_SUFFIXES:
        lines, unusable = describe_particles(path, args.project_root)
    elif suffix in MRC_SUFFIXES:
        lines = describe_mrc(path)
    else:
        raise InputError(
            path, f"unknown file type {suffix!r}: expected .star, .cs, .mrc, .mrcs or .map"
        )
    print("\n".join(lines))
    if unusable is not None:  # described above, but nothing can be reconstructed from it
        raise unusable
    return 0


def _row(label: str, value: str) -> str:
    return f"{label + ':':<20}{value}"


def _range(values: np.ndarray, unit: str, digits: int = 0) -> str:
    return (
        f"{values.min():.{digits}f} .. {values.max():.{digits}f} {unit} "
        f"(mean {values.mean():.{digits}f})"
    )


def _aliasing(table: ParticleTable, box: int, pixel_a: float) -> str:
    """Where the median particle's CTF starts to alias in its box: the signal of finer detail
    lies outside the image (RELION and cryoSPARC advise a larger box)."""
    limits = box_limits(table.ctf, box, pixel_a, 0.0)
    if not math.isfinite(limits.aliasing_a):
        return "unknown"
    if at_nyquist(limits.aliasing_a, pixel_a):
        return f"sampled up to Nyquist at the median defocus ({limits.defocus_a:.0f} A)"
    return (f"aliases beyond {limits.aliasing_a:.1f} A at the median defocus "
            f"({limits.defocus_a:.0f} A): finer detail's signal lies outside the {box}-px box")


def _number(value: float, unit: str = "") -> str:
    if not math.isfinite(value):
        return "unknown"
    return f"{value:g}{unit}"


def describe_particles(path: Path, project_root: Path | None
                       ) -> tuple[list[str], InputError | None]:
    """The description of a particle file, and the error when images it names are missing,
    short or unreadable (None otherwise: metadata-only files and mixed optics are described
    with exit 0)."""
    table = read_particle_table(path, project_root, check_images=False)
    lines = [_row("File", f"{path} ({_KINDS.get(table.kind, table.kind)})")]
    lines.append(_row("Particles", f"{len(table):,}"))
    boxes = np.unique(table.box_size[table.box_size > 0])
    lines.append(_row("Box", ", ".join(f"{b} px" for b in boxes) if boxes.size else "unknown"))
    pixels = np.unique(np.round(table.pixel_size_a[np.isfinite(table.pixel_size_a)], 6))
    lines.append(
        _row("Pixel size", ", ".join(f"{p:g} A" for p in pixels) if pixels.size else "unknown")
    )
    lines.append(_row("Optics groups", str(len(table.optics_groups))))
    counts = {
        int(k): int(v)
        for k, v in zip(*np.unique(table.optics_group, return_counts=True), strict=True)
    }
    for g in table.optics_groups:
        lines.append(
            f"  {g.name} (#{g.number}, {counts.get(g.number, 0):,} particles): "
            f"{_number(g.voltage_kv, ' kV')}, Cs {_number(g.spherical_aberration_mm, ' mm')}, "
            f"Q0 {_number(g.amplitude_contrast)}, {_number(g.pixel_size_a, ' A/px')}, "
            f"box {g.box_size if g.box_size > 0 else 'unknown'}"
        )
    if table.ctf is not None:
        du = table.ctf.defocus_u_a.numpy()
        dv = table.ctf.defocus_v_a.numpy()
        lines.append(_row("Defocus U", _range(du, "A")))
        lines.append(_row("Defocus V", _range(dv, "A")))
        lines.append(_row("Astigmatism |U-V|", _range(np.abs(du - dv), "A")))
        if boxes.size == 1 and pixels.size == 1 and len(table) > 0:
            lines.append(_row("CTF in the box", _aliasing(table, int(boxes[0]),
                                                          float(pixels[0]))))
        phase = table.ctf.phase_shift_deg.numpy()
        if np.any(phase != 0):
            lines.append(_row("Phase shift", _range(phase, "deg", 1)))
    else:
        lines.append(_row("CTF", "none (bare image stack)"))
    lines.append(_row("Poses", "present" if table.poses is not None else "absent"))
    if table.poses is not None and pixels.size == 1:
        offsets_a = np.hypot(*table.poses.shifts_px.numpy().T) * float(pixels[0])
        lines.append(_row("Offsets", f"median {np.median(offsets_a):.1f} A, 90% within "
                                     f"{np.percentile(offsets_a, 90):.1f} A, largest "
                                     f"{offsets_a.max():.1f} A"))
    if boxes.size == 1 and pixels.size == 1 and len(table) > 100:
        defaults = _chosen_defaults(path, int(boxes[0]), float(pixels[0]), len(table))
        lines.append(_row("Defaults", f"reconstruct would use {defaults}"))
    lines.append(_row("Image stacks", _describe_stacks(table)))
    for note in table.notes:
        lines.append(_row("Note", note))
    try:
        ParticleDataset.from_table(table, require_images=True)
        lines.append(_row("Usable", "yes"))
    except InputError as err:
        lines.append(_row("Usable", f"no: {err.problem}"))
    if table.missing_stacks:  # named images that are missing, short or damaged: exit 2
        return lines, InputError(path, f"image stacks: {_describe_stacks(table)}")
    return lines, None


def _chosen_defaults(path: Path, box: int, pixel_a: float, n_particles: int) -> str:
    """What `reconstruct` chooses from the data when given only this file."""
    from cryostoch.engine.config import ReconstructionConfig
    from cryostoch.engine.prepare import working_geometry
    from cryostoch.engine.schedule import run_epochs

    config = ReconstructionConfig(particles=str(path), out_dir="")
    geometry = working_geometry(config, box, pixel_a)
    epochs = run_epochs(config, n_particles - config.test_size)
    return (f"diameter {2 * geometry.particle_radius_px * pixel_a:.0f} A, cutoff "
            f"{geometry.cutoff_resolution_a:.1f} A, shifts within {geometry.shift_range_a:.1f} A,"
            f" {epochs:.3g} epochs")


def _describe_stacks(table: ParticleTable) -> str:
    if not table.stacks:
        return "none (the file names no images)"
    missing = table.missing_stacks
    total = len(table.stacks)
    if not missing:
        return f"{total:,} (all found and checked)"
    first = missing[0]
    return (
        f"{total:,}, {len(missing):,} missing or unusable (first: {first.written}: {first.problem})"
    )


def describe_mrc(path: Path) -> list[str]:
    header = read_header(path)
    nz, ny, nx = header.shape
    # Space group 0 marks a stack; many writers leave 1, so a non-cubic file is a stack too.
    is_stack = header.is_stack or not (nz == ny == nx)
    lines = [_row("File", f"{path} ({'MRC image stack' if is_stack else 'MRC map'})")]
    if is_stack:
        lines.append(_row("Images", f"{nz:,} of {ny} x {nx} px"))
    lines.append(_row("Shape (z, y, x)", f"{nz} x {ny} x {nx}"))
    lines.append(_row("Mode", f"{header.mode} ({MODE_DTYPES[header.mode].name})"))
    vx, vy, vz = header.voxel_size_a
    if vx > 0:
        voxel = f"{vx:g} A" if vx == vy else f"{vx:g} x {vy:g} A (x, y)"
        if not is_stack and vz != vx:
            voxel += f", z {vz:g} A"
    else:
        voxel = "not set in the header"
    lines.append(_row("Voxel size", voxel))
    lo, hi, mean, std = data_statistics(header)
    lines.append(_row("Min / max", f"{lo:.6g} / {hi:.6g}"))
    lines.append(_row("Mean / std", f"{mean:.6g} / {std:.6g}"))
    return lines
