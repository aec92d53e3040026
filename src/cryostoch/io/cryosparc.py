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
from cryostoch.io.records import ParticleTable
from cryostoch.io.table_builder import (
    CTF_REQUIRED,
    HEADER_PIXEL_SIZE,
    ParticleSource,
    PixelSource,
    build_table,
)

# The .cs field of each CtfParameters field, and the conversion to its unit (None: same).
CS_CTF = {
    "defocus_u_a": ("ctf/df1_A", None),
    "defocus_v_a": ("ctf/df2_A", None),
    "defocus_angle_deg": ("ctf/df_angle_rad", np.rad2deg),
    "voltage_kv": ("ctf/accel_kv", None),
    "spherical_aberration_mm": ("ctf/cs_mm", None),
    "amplitude_contrast": ("ctf/amp_contrast", None),
    "phase_shift_deg": ("ctf/phase_shift_rad", np.rad2deg),
    "bfactor_a2": ("ctf/bfactor", None),
    "scale": ("ctf/scale", None),
}
CTF_FIELDS = tuple(CS_CTF[name][0] for name in CTF_REQUIRED)


def read_cs(path: str | os.PathLike[str]) -> np.ndarray:
    """The structured array of a `.cs` file; InputError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such cryoSPARC .cs file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        # numpy reads bytes that are no .npy header as a pickle and then suggests
        # allow_pickle, which must not be followed for a file of unknown origin
        reason = "not a numpy array file" if "pickle" in str(err) else str(err)
        raise InputError(path, f"not a readable cryoSPARC .cs file ({reason})") from None
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


class CsParticles(ParticleSource):
    """`build_table` adapter of a cryoSPARC particle `.cs` file."""

    kind = "cs"
    image_column = "blob/path"
    no_images = "no blob/path and blob/idx fields"

    def __init__(self, path: Path):
        self.source = path
        self.data = read_cs(path)
        self.names = set(self.data.dtype.names)
        if self.data.shape[0] == 0:
            raise InputError(path, "the .cs file holds no particles")
        missing = [f for f in CTF_FIELDS if f not in self.names]
        if missing:
            raise InputError(
                path,
                f"missing CTF fields: {', '.join(missing)} (export particles after CTF "
                "estimation)",
            )
        self.metadata = cs_to_dataframe(self.data)

    def field(self, name: str) -> np.ndarray:
        """A field as float64, checked finite."""
        values = np.asarray(self.data[name], dtype=np.float64)
        check_finite(self.source, name, values)
        return values

    def image_references(self) -> tuple[np.ndarray, pd.Series] | None:
        if "blob/path" not in self.names or "blob/idx" not in self.names:
            return None
        raw = np.char.decode(np.asarray(self.data["blob/path"]), "utf-8", errors="replace")
        # cryoSPARC marks paths inside the project (often symlinks to imports) with '>'.
        return (np.asarray(self.data["blob/idx"], dtype=np.int64),
                pd.Series(np.char.lstrip(raw.astype(str), ">"), dtype=object))

    def _pixel_size(self) -> np.ndarray | None:
        if "blob/psize_A" not in self.names:
            return None
        values = self.field("blob/psize_A")
        check_positive(self.source, "blob/psize_A", values)
        return values

    def pixel_sources(self, header_pixel: np.ndarray) -> list[PixelSource]:
        # the header note is kept even where no header sets a size (as this reader always did)
        return [("blob/psize_A", self._pixel_size), (HEADER_PIXEL_SIZE, lambda: header_pixel)]

    def no_pixel_size(self, first: int) -> str:
        return "no blob/psize_A field and the stack headers set no pixel size"

    def recorded_box(self) -> np.ndarray | None:
        if "blob/shape" not in self.names:
            return None
        shape = np.asarray(self.data["blob/shape"], dtype=np.int64).reshape(len(self), -1)
        if shape.shape[1] != 2 or (shape[:, 0] != shape[:, 1]).any():
            raise InputError(self.source, "blob/shape: the images are not square")
        return shape[:, 0]

    def ctf_name(self, field: str) -> str:
        return CS_CTF[field][0]

    def ctf_values(self, field: str) -> np.ndarray | None:
        name, to_unit = CS_CTF[field]
        if name not in self.names:
            return None
        values = self.field(name)
        return values if to_unit is None else to_unit(values)

    def amplitude_contrast_problem(self, q0: np.ndarray, first: int) -> str:
        return "ctf/amp_contrast must be in [0, 1)"  # wording of this reader before issue 10

    def origins(self, pixel: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        if "alignments3D/pose" not in self.names:
            return None
        n = len(self)
        euler = cryosparc_rotvec_to_relion_euler(self.field("alignments3D/pose").reshape(n, 3))
        if "alignments3D/shift" not in self.names:
            return euler, np.zeros((n, 2))
        shift = self.field("alignments3D/shift").reshape(n, 2)
        if "alignments3D/psize_A" in self.names:
            # shifts are in pixels of the alignment; convert to pixels of the blob
            align_pixel = self.field("alignments3D/psize_A")
            if (align_pixel > 0).all() and np.isfinite(pixel).all():
                shift = shift * (align_pixel / pixel)[:, None]
        return euler, shift

    def group_key(self) -> np.ndarray | None:
        """Optics groups: one per exposure group and distinct optics."""
        if "ctf/exp_group_id" not in self.names:
            return None
        return np.asarray(self.data["ctf/exp_group_id"], dtype=np.float64)

    def group_name(self, first: int, k: int) -> str:
        key = self.group_key()
        return f"exp_group_{0 if key is None else int(key[first])}"


def read_particle_cs(
    path: str | os.PathLike[str],
    project_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
) -> ParticleTable:
    """Read a cryoSPARC particle `.cs` file into a ParticleTable (see `open_particles`)."""
    return build_table(CsParticles(Path(path)), project_root, check_images)
