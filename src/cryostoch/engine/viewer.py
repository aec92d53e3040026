"""The ChimeraX command script of a run folder: `open_in_chimerax.cxc`.

Opening it in ChimeraX (`chimerax DIR/open_in_chimerax.cxc`, or File > Open) shows map.mrc as
a surface at a level chosen from the map (`evaluate.shape.surface_level`: the level enclosing
the molecule's volume when its mass is known, else a share of the particle-diameter sphere),
with the run's other maps (map_fullbox.mrc, class_NN.mrc) opened hidden, on a white background
with soft lighting. ChimeraX runs a .cxc with the script's folder as the working directory, so
the relative file names keep working when the run folder is moved. Model numbers #1, #2, ...
are those of a ChimeraX session with no models open.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from cryostoch import __version__
from cryostoch.engine.run_folder import CHIMERAX_SCRIPT
from cryostoch.evaluate.shape import surface_level


@dataclass(frozen=True)
class ViewedMap:
    """A map of the run folder as the script opens it: `name` (file name in the folder), its
    `volume` (N, N, N) and voxel size, what it is (a comment) and whether it is shown."""

    name: str
    volume: Tensor
    voxel_size_a: float
    what: str
    shown: bool = False


def chimerax_script(maps: Sequence[ViewedMap], *, particle_diameter_a: float,
                    mass_kda: float | None = None) -> str:
    """The script's text: every map opened (as model #1, #2, ... in order) with its surface
    level (`surface_level` of that map) and voxel size, the hidden ones hidden, then `view`,
    a white background and soft lighting."""
    commands, rule = [], ""
    for model, viewed in enumerate(maps, start=1):
        level, rule = surface_level(viewed.volume, viewed.voxel_size_a,
                                    particle_diameter_a=particle_diameter_a, mass_kda=mass_kda)
        hidden = "" if viewed.shown else f" (hidden; `volume #{model} show` shows it)"
        commands += [
            f"# #{model} {viewed.name}: {viewed.what}{hidden}",
            f"open {viewed.name}",
            f"volume #{model} style surface level {level:.6g} voxelSize "
            f"{viewed.voxel_size_a:.8g}" + ("" if viewed.shown else " hide"),
        ]
    header = [
        f"# ChimeraX command script written by cryostoch {__version__}: this run's maps.",
        "# Open it in ChimeraX (chimerax open_in_chimerax.cxc, or File > Open); the paths are",
        "# relative to this folder. Model numbers assume no other models are open.",
        f"# Surface level of each map: the level that {rule}.",
    ]
    footer = ["view", "set bgColor white", "lighting soft", "graphics silhouettes true"]
    return "\n".join(header + commands + footer) + "\n"


def write_chimerax_script(path: Path, maps: Sequence[ViewedMap], *,
                          particle_diameter_a: float, mass_kda: float | None = None) -> None:
    """Write `chimerax_script` to `path` (a staged output: `StagedOutputs.path`)."""
    Path(path).write_text(chimerax_script(maps, particle_diameter_a=particle_diameter_a,
                                          mass_kda=mass_kda))


__all__ = ["CHIMERAX_SCRIPT", "ViewedMap", "chimerax_script", "write_chimerax_script"]
