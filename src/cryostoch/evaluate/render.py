"""Pictures of a map for the run report: isosurfaces seen along x, y and z, and PNG bytes.

The surface is scikit-image's marching cubes at a given level, drawn by matplotlib's
`Poly3DCollection` in an orthographic view, each triangle shaded by its angle to a light that
sits near the viewer (two-sided Lambert shading: the surface of a noisy map is not always
closed, so no face is dark just for facing away). Coordinates follow the map's (z, y, x)
index order, and each view is oriented as the central slice and projection of
`plots.map_views` along the same axis: along z, x to the right and y up (as ChimeraX opens a
map); along y, x to the right and z up; along x, y to the right and z up. No pyplot state:
every figure is a plain `matplotlib.figure.Figure` with an Agg canvas.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SURFACE_RGB = (0.93, 0.78, 0.35)  # a warm yellow, as ChimeraX's default map colour
AMBIENT = 0.3  # the share of light every face gets
MAX_FACES = 60_000  # coarser marching-cubes steps above this (drawing time grows with it)
FIGURE_DPI = 90


@dataclass(frozen=True)
class View:
    """An orthographic view down one axis: matplotlib's elevation and azimuth (degrees) and
    the screen's right and up directions in (x, y, z)."""

    elev: float
    azim: float
    right: tuple[float, float, float]
    up: tuple[float, float, float]

    @property
    def towards_viewer(self) -> np.ndarray:
        return np.cross(self.right, self.up)


VIEWS = {
    "x": View(0.0, 0.0, (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "y": View(0.0, -90.0, (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "z": View(90.0, -90.0, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}


def _numpy(volume: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(volume, Tensor):
        volume = volume.detach().to("cpu").double().numpy()
    return np.asarray(volume, dtype=np.float32)


def isosurface(volume: Tensor | np.ndarray, level: float, *, step: int = 1
               ) -> tuple[np.ndarray, np.ndarray]:
    """The surface where the map (N, N, N), indexed [z, y, x], equals `level`: vertices (V, 3)
    as (x, y, z) in voxels (voxel i's centre at i) and triangles (F, 3) of vertex indices.
    `step` > 1 samples every step-th voxel (a coarser, faster mesh). Both empty when the level
    is outside the map's range."""
    from skimage.measure import marching_cubes

    data = _numpy(volume)
    if not (float(data.min()) < level < float(data.max())):
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    vertices, faces, _, _ = marching_cubes(data, level=float(level), step_size=int(step),
                                           allow_degenerate=False)
    return vertices[:, ::-1].astype(np.float64), faces.astype(np.int64)


def mesh_step(volume: Tensor | np.ndarray, level: float, max_faces: int = MAX_FACES) -> int:
    """The marching-cubes step that keeps the mesh under about `max_faces` triangles, from the
    share of voxels on the surface (a surface's triangles scale as 1 / step^2)."""
    data = _numpy(volume)
    inside = data > level
    boundary = inside ^ np.roll(inside, 1, 0) | inside ^ np.roll(inside, 1, 1) \
        | inside ^ np.roll(inside, 1, 2)
    faces = 2.5 * float(boundary.sum())  # about two to three triangles per surface voxel
    return max(1, math.ceil(math.sqrt(faces / max_faces)))


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3) unit normals of the triangles (zero for a degenerate one)."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    normals = np.cross(b - a, c - a)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.where(length > 0, length, 1.0)


def shading(normals: np.ndarray, view: View) -> np.ndarray:
    """(F,) brightness in [AMBIENT, 1] of faces with `normals` under a light above and to the
    left of the viewer (two-sided)."""
    light = view.towards_viewer + 0.5 * np.asarray(view.up) - 0.35 * np.asarray(view.right)
    light = light / np.linalg.norm(light)
    return AMBIENT + (1.0 - AMBIENT) * np.abs(normals @ light)


def draw_isosurface(ax: Axes, vertices: np.ndarray, faces: np.ndarray, view: View, *,
                    centre: np.ndarray, half_width: float) -> None:
    """Draw the mesh on a 3-D axes `ax` seen along `view`, in the cube of `half_width` voxels
    about `centre` (x, y, z)."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    ax.set_proj_type("ortho")
    ax.view_init(elev=view.elev, azim=view.azim)
    if len(faces):
        colours = np.asarray(SURFACE_RGB)[None] * shading(face_normals(vertices, faces),
                                                          view)[:, None]
        # edges in the face's colour: no hairline seams between antialiased triangles
        ax.add_collection3d(Poly3DCollection(vertices[faces], facecolors=colours,
                                             edgecolors=colours, linewidths=0.3))
    else:
        ax.text2D(0.5, 0.5, "no surface at this level", transform=ax.transAxes,
                  ha="center", va="center", fontsize=9)
    for limits, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre, strict=True):
        limits(c - half_width, c + half_width)
    ax.set_box_aspect((1, 1, 1), zoom=1.35)
    ax.set_axis_off()


def _frame(meshes: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, float]:
    """The centre and half-width of one cube that holds every mesh (the box if none)."""
    points = [v[np.unique(f)] for v, f in meshes if len(f)]
    if not points:
        return np.full(3, (n - 1) / 2), n / 2
    every = np.concatenate(points)
    low, high = every.min(0), every.max(0)
    return (low + high) / 2, max(float((high - low).max()) / 2 * 1.05, 2.0)


def isosurface_figure(volumes: Sequence[Tensor | np.ndarray], levels: Sequence[float], *,
                      labels: Sequence[str] | None = None, views: str = "xyz",
                      panel_inches: float = 3.0) -> Figure:
    """One row per map (each (N, N, N)), one column per view ("x", "y", "z"): the isosurface
    of each map at its level, all in the same frame and scale (so the rows compare)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meshes = [isosurface(v, lv, step=mesh_step(v, lv)) for v, lv in zip(volumes, levels,
                                                                         strict=True)]
    centre, half_width = _frame(meshes, int(np.shape(volumes[0])[-1]))
    rows, cols = len(meshes), len(views)
    fig = Figure(figsize=(panel_inches * cols, panel_inches * rows + 0.3))
    FigureCanvasAgg(fig)
    for r, (vertices, faces) in enumerate(meshes):
        for c, name in enumerate(views):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1, projection="3d")
            draw_isosurface(ax, vertices, faces, VIEWS[name], centre=centre,
                            half_width=half_width)
            title = f"view along {name}"
            if labels is not None and c == 0:
                title = f"{labels[r]}: {title}"
            ax.set_title(title, fontsize=9, pad=0)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - 0.3 / fig.get_figheight(),
                        wspace=0, hspace=0.05)
    return fig


def figure_png(fig: Figure, *, dpi: int = FIGURE_DPI) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    # no Software text chunk (matplotlib's carries its web address): nothing but the picture
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


__all__ = ["VIEWS", "View", "draw_isosurface", "face_normals", "figure_png", "isosurface",
           "isosurface_figure", "mesh_step", "shading"]
