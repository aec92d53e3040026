"""report.html (issue 16): the isosurface and threshold against analytic facts, the views'
orientation against matplotlib's own projection, equal-area direction bins, and the pages that
reconstruct and refine write (parsed, every figure a valid embedded PNG, nothing fetched)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from bad_input_support import reconstruct_argv
from cryostoch.cli.main import main
from cryostoch.engine.run_folder import FINAL_OUTPUTS, run_outputs
from cryostoch.evaluate.render import VIEWS, draw_isosurface, isosurface
from cryostoch.evaluate.report_figures import direction_histogram
from cryostoch.evaluate.report_html import PNG_SIGNATURE
from cryostoch.evaluate.shape import A3_PER_DALTON, enclosing_threshold, surface_level
from test_refine import refine_argv, refine_sim  # noqa: F401 (refine_sim: a fixture)

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr", "area", "base"}
RECONSTRUCT_FIGURES = {"isosurfaces", "slices_projections", "convergence", "noise_spectrum",
                       "viewing_directions", "confidence"}
REFINE_FIGURES = {"isosurfaces", "slices_projections", "fsc", "guinier", "viewing_directions"}


# ------------------------------------------------------------------ geometry of the pictures
def test_isosurface_of_a_sphere_lies_at_its_radius():
    n, radius = 48, 9.0
    centre = np.array([27.0, 21.0, 18.0])  # (x, y, z): off-centre, three different values
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij")
    r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    sigma = 6.0
    volume = torch.from_numpy(np.exp(-(r**2) / (2 * sigma**2)))  # indexed [z, y, x]
    level = float(np.exp(-(radius**2) / (2 * sigma**2)))
    vertices, faces = isosurface(volume, level)
    assert len(faces) > 500
    distance = np.linalg.norm(vertices - centre, axis=1)
    assert np.abs(distance - radius).max() < 1.0
    assert abs(distance.mean() - radius) < 0.1
    assert isosurface(volume, 2.0)[1].shape == (0, 3)  # above the maximum: no surface


def test_threshold_encloses_the_requested_volume():
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(40, 40, 40, generator=g, dtype=torch.float64)
    pixel = 2.5
    for volume_a3 in (1000.0, 123_456.0, 600_000.0):
        level = enclosing_threshold(volume, volume_a3, pixel)
        assert int((volume >= level).sum()) == round(volume_a3 / pixel**3)
    mass_kda = 50.0
    level, rule = surface_level(volume, pixel, particle_diameter_a=80.0, mass_kda=mass_kda)
    enclosed_a3 = int((volume >= level).sum()) * pixel**3
    assert abs(enclosed_a3 - mass_kda * 1000 * A3_PER_DALTON) <= pixel**3 / 2
    assert "50 kDa" in rule


def test_views_are_oriented_as_the_slices():
    """Matplotlib's projection puts each view's `right` to the right and `up` up on screen
    (along z: x right, y up, as the central slice along z shows the map)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from mpl_toolkits.mplot3d import proj3d

    expected = {"x": ("y", "z"), "y": ("x", "z"), "z": ("x", "y")}
    axis_vector = {"x": (1, 0, 0), "y": (0, 1, 0), "z": (0, 0, 1)}
    for name, view in VIEWS.items():
        fig = Figure()
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1, projection="3d")
        draw_isosurface(ax, np.zeros((0, 3)), np.zeros((0, 3), dtype=int), view,
                        centre=np.zeros(3), half_width=1.0)
        fig.canvas.draw()
        origin = np.array(proj3d.proj_transform(0, 0, 0, ax.get_proj())[:2])
        right, up = expected[name]
        on_right = np.array(proj3d.proj_transform(*axis_vector[right], ax.get_proj())[:2])
        on_top = np.array(proj3d.proj_transform(*axis_vector[up], ax.get_proj())[:2])
        assert np.allclose(np.sign(np.round(on_right - origin, 6)), [1, 0]), name
        assert np.allclose(np.sign(np.round(on_top - origin, 6)), [0, 1]), name
        assert tuple(view.right) == axis_vector[right] and tuple(view.up) == axis_vector[up]


def test_direction_bins_have_equal_areas():
    """Uniform directions fill every bin alike; tilt 0 is the north pole."""
    rng = np.random.default_rng(1)
    v = rng.standard_normal((200_000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rot = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    tilt = np.degrees(np.arccos(v[:, 2]))
    _, lat_edges, counts = direction_histogram(rot, tilt, 8)
    assert counts.shape == (8, 16) and counts.sum() == len(v)
    expected = len(v) / counts.size
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)
    _, _, pole = direction_histogram(np.array([30.0]), np.array([1.0]), 8)
    assert pole[-1].sum() == 1 and np.isclose(lat_edges[-1], np.pi / 2)


# ------------------------------------------------------------------ the page
class PageParser(HTMLParser):
    """Tags balanced (every non-void element closed in order), the <img> tags, and every
    attribute value and text."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[dict] = []
        self.problems: list[str] = []
        self.strings: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.strings += [v for v in attributes.values() if v]
        if tag == "img":
            self.images.append(attributes)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(f"unbalanced </{tag}>")

    def handle_data(self, data):
        self.strings.append(data)


def page_figures(path: Path) -> dict[str, bytes]:
    """Parse report.html and check it is self-contained: returns each figure's PNG bytes."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser = PageParser()
    parser.feed(text)
    parser.close()
    assert not parser.problems and not parser.stack, (parser.problems, parser.stack)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    figures = {}
    for image in parser.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix)
        png = base64.b64decode(image["src"][len(prefix):], validate=True)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
        assert image["data-figure"] not in figures
        figures[image["data-figure"]] = png
    return figures


def test_reconstruct_writes_a_self_contained_report(finished, sim, tmp_path):
    page = finished / "report.html"
    assert "report.html" in FINAL_OUTPUTS and page in run_outputs(finished)
    assert set(page_figures(page)) == RECONSTRUCT_FIGURES
    text = page.read_text()
    assert "particles.star" in text and "<td>200</td>" in text  # the file and its count
    out = tmp_path / "classes"
    assert main(reconstruct_argv(sim, out, "--classes", "2")) == 0
    assert set(page_figures(out / "report.html")) == RECONSTRUCT_FIGURES | {
        "class_sizes", "class_isosurfaces"}


def test_reconstruct_refreshes_the_report_at_checkpoints(sim, tmp_path, monkeypatch):
    from cryostoch.engine.reconstruct import Reconstruction

    pages = []
    real = Reconstruction._progress_report

    def keep_a_copy(self):
        real(self)
        pages.append(tmp_path / f"page_{len(pages)}.html")
        shutil.copy(self.out / "report.html", pages[-1])

    monkeypatch.setattr(Reconstruction, "_progress_report", keep_a_copy)
    out = tmp_path / "run"
    assert main(reconstruct_argv(sim, out, "--epochs", "1", "--batch-size", "65",
                                 "--checkpoint-interval-s", "0")) == 0
    assert len(pages) == 2  # after steps 1 and 2 of 3; the end writes the final page
    assert set(page_figures(pages[-1])) == RECONSTRUCT_FIGURES - {"viewing_directions",
                                                                  "confidence"}
    assert "in progress" in pages[-1].read_text()
    assert "in progress" not in (out / "report.html").read_text()


def test_refine_writes_a_self_contained_report(refine_sim, tmp_path):  # noqa: F811
    out = tmp_path / "refined"
    assert main(refine_argv(refine_sim, out, "--iterations", "1")) == 0
    page = out / "report.html"
    assert set(page_figures(page)) == REFINE_FIGURES
    text = page.read_text()
    assert "FSC 0.143" in text and "<th>poses moved (deg)</th>" in text
    assert text.count("<tr>") >= 2 + 1  # the per-iteration table: header and rows
    assert "the CTF aliased in the box (median defocus) beyond" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(finished, tmp_path):
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,2000",
                    (finished / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 0
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.std() > 0.05  # not blank: text and figures
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 100
