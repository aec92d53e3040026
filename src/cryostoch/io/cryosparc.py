"""cryoSPARC `.cs` particle files (numpy structured arrays).

Fields used: `blob/path`, `blob/idx` (0-based), `blob/shape`, `blob/psize_A`; `ctf/accel_kv`,
`ctf/cs_mm`, `ctf/amp_contrast`, `ctf/df1_A`, `ctf/df2_A`, `ctf/df_angle_rad`,
`ctf/phase_shift_rad`, `ctf/bfactor`, `ctf/scale`, `ctf/exp_group_id` where present; and
`alignments3D/pose` (rotation vector, radians) + `alignments3D/shift` (pixels).

Pose convention: RELION's matrix is the transpose of the rotation whose axis-angle vector is
`alignments3D/pose` (see `cryostoch.io._euler.cryosparc_rotvec_to_relion_euler`), and the shift
has the sign of RELION's origin, so the model shift is `t = -shift` (in pixels of
`alignments3D/psize_A`, rescaled here to the pixels of the blob).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from cryostoch.errors import InputError
from cryostoch.io._common import check_finite, check_positive
from cryostoch.io._euler import cryosparc_rotvec_to_relion_euler
from cryostoch.io.records import (
    OpticsGroup,
    ParticleTable,
    as_tensor64,
    check_stack_boxes,
    locate_images,
    pixel_and_box_from_stacks,
    poses_from_arrays,
)
from cryostoch.operators.ctf import CtfParameters

CTF_FIELDS = (
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
)


def read_cs(path: str | os.PathLike[str]) -> np.ndarray:
    """The structured array of a `.cs` file; InputError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such cryoSPARC .cs file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(path, f"not a readable cryoSPARC .cs file ({err})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        data.close()
        raise InputError(path, "not a cryoSPARC .cs file (a .npz archive)")
    if data.dtype.names is None or data.ndim != 1:
        raise InputError(path, "not a cryoSPARC .cs file (no structured particle array)")
    return data


def cs_to_dataframe(data: np.ndarray) -> pd.DataFrame:
    """One column per field; vector fields become `field/0`, `field/1`, ...; bytes -> str."""
    columns: dict[str, np.ndarray] = {}
    for name in data.dtype.names:
        values = data[name]
        if values.dtype.kind == "S":
            columns[name] = np.char.decode(values, "utf-8", errors="replace").astype(object)
        elif values.ndim == 1:
            columns[name] = values
        else:
            flat = values.reshape(values.shape[0], -1)
            for j in range(flat.shape[1]):
                columns[f"{name}/{j}"] = flat[:, j]
    return pd.DataFrame(columns)


def _field(path: Path, data: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(data[name], dtype=np.float64)
    check_finite(path, name, values)
    return values


def read_particle_cs(
    path: str | os.PathLike[str],
    project_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
) -> ParticleTable:
    """Read a cryoSPARC particle `.cs` file into a ParticleTable (see `open_particles`)."""
    path = Path(path)
    data = read_cs(path)
    names = set(data.dtype.names)
    n = data.shape[0]
    if n == 0:
        raise InputError(path, "the .cs file holds no particles")
    missing = [f for f in CTF_FIELDS if f not in names]
    if missing:
        raise InputError(
            path,
            f"missing CTF fields: {', '.join(missing)} (export particles after CTF estimation)",
        )
    notes: list[str] = []

    # Images.
    references = None
    if "blob/path" in names and "blob/idx" in names:
        raw = np.char.decode(np.asarray(data["blob/path"]), "utf-8", errors="replace")
        # cryoSPARC marks paths inside the project (often symlinks to imports) with '>'.
        references = (np.asarray(data["blob/idx"], dtype=np.int64),
                      pd.Series(np.char.lstrip(raw.astype(str), ">"), dtype=object))
    slot, stack_id, stacks = locate_images(path, n, references, project_root, check_images,
                                           "blob/path", "no blob/path and blob/idx fields")
    header_pixel, header_box = pixel_and_box_from_stacks(stacks, stack_id)

    if "blob/psize_A" in names:
        pixel = _field(path, data, "blob/psize_A")
        check_positive(path, "blob/psize_A", pixel)
        notes.append("pixel size from blob/psize_A")
    else:
        pixel = header_pixel
        notes.append("pixel size from the MRC header of the stacks")
        if np.isnan(pixel).any() and check_images:
            raise InputError(path, "no blob/psize_A field and the stack headers set no pixel size")

    if "blob/shape" in names:
        shape = np.asarray(data["blob/shape"], dtype=np.int64).reshape(n, -1)
        if shape.shape[1] != 2 or (shape[:, 0] != shape[:, 1]).any():
            raise InputError(path, "blob/shape: the images are not square")
        box = shape[:, 0]
        check_stack_boxes(path, stacks, stack_id, box)
    else:
        check_stack_boxes(path, stacks, stack_id, np.zeros(n, dtype=np.int64))
        box = np.where(header_box > 0, header_box, 0).astype(np.int64)

    voltage = _field(path, data, "ctf/accel_kv")
    check_positive(path, "ctf/accel_kv", voltage)
    cs_mm = _field(path, data, "ctf/cs_mm")
    q0 = _field(path, data, "ctf/amp_contrast")
    if ((q0 < 0) | (q0 >= 1)).any():
        raise InputError(path, "ctf/amp_contrast must be in [0, 1)")

    def optional(name: str, default: float) -> np.ndarray:
        return _field(path, data, name) if name in names else np.full(n, default)

    ctf = CtfParameters(
        defocus_u_a=as_tensor64(_field(path, data, "ctf/df1_A")),
        defocus_v_a=as_tensor64(_field(path, data, "ctf/df2_A")),
        defocus_angle_deg=as_tensor64(np.rad2deg(_field(path, data, "ctf/df_angle_rad"))),
        voltage_kv=as_tensor64(voltage),
        spherical_aberration_mm=as_tensor64(cs_mm),
        amplitude_contrast=as_tensor64(q0),
        phase_shift_deg=as_tensor64(np.rad2deg(optional("ctf/phase_shift_rad", 0.0))),
        bfactor_a2=as_tensor64(optional("ctf/bfactor", 0.0)),
        scale=as_tensor64(optional("ctf/scale", 1.0)),
    )

    poses = None
    if "alignments3D/pose" in names:
        rotvec = _field(path, data, "alignments3D/pose").reshape(n, 3)
        euler = cryosparc_rotvec_to_relion_euler(rotvec)
        if "alignments3D/shift" in names:
            shift = _field(path, data, "alignments3D/shift").reshape(n, 2)
            if "alignments3D/psize_A" in names:
                # shifts are in pixels of the alignment; convert to pixels of the blob
                align_pixel = _field(path, data, "alignments3D/psize_A")
                if (align_pixel > 0).all() and np.isfinite(pixel).all():
                    shift = shift * (align_pixel / pixel)[:, None]
        else:
            shift = np.zeros((n, 2))
        poses = poses_from_arrays(euler, -shift)

    # Optics groups: one per exposure group and distinct optics.
    group_id = (
        np.asarray(data["ctf/exp_group_id"], dtype=np.float64)
        if "ctf/exp_group_id" in names
        else np.zeros(n)
    )
    keys = np.stack([group_id, voltage, cs_mm, q0, np.round(pixel, 6), box], axis=1)
    keys = np.where(np.isnan(keys), -1.0, keys)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    groups = []
    for k, u in enumerate(order):
        i = first[u]
        groups.append(
            OpticsGroup(
                name=f"exp_group_{int(group_id[i])}",
                number=k + 1,
                voltage_kv=float(voltage[i]),
                spherical_aberration_mm=float(cs_mm[i]),
                amplitude_contrast=float(q0[i]),
                pixel_size_a=float(pixel[i]),
                box_size=int(box[i]),
            )
        )

    return ParticleTable(
        source_path=path,
        kind="cs",
        metadata=cs_to_dataframe(data),
        optics_table=None,
        optics_groups=groups,
        optics_group=rank[inverse.reshape(-1)] + 1,
        ctf=ctf,
        poses=poses,
        pixel_size_a=pixel,
        box_size=box,
        stacks=stacks,
        stack_id=stack_id,
        stack_slot=slot,
        notes=notes,
    )
