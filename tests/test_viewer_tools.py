"""Issue 16: `flip-hand`, `align`, the ChimeraX script of every run and clean log axes.

Each result is compared with an independent computation: numpy's flip, scipy.ndimage's affine
transform and analytic Gaussian maps, a threshold computed here from the map's values, and the
rendered tick labels' boxes.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil

import mrcfile
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bad_input_support import FAST, refused, write_volume
from cryostoch.cli.main import main
from cryostoch.evaluate.align import Alignment
from cryostoch.evaluate.fsc import compute_fsc
from cryostoch.evaluate.superimpose import symmetry_equivalent
from cryostoch.evaluate.transform import resample_onto_grid
from cryostoch.geometry import euler_to_matrix, point_group

# Asymmetric arrangement of Gaussian blobs: (x, y, z) centres and sigmas in Angstrom
CENTRES_A = np.array([[0.0, 0.0, 0.0], [14.0, 3.0, -2.0], [-6.0, 12.0, 5.0],
                      [-4.0, -9.0, 11.0], [7.0, -5.0, -13.0]])
SIGMAS_A = np.array([6.0, 4.5, 5.0, 4.0, 5.5])
WEIGHTS = np.array([1.0, 0.8, 0.9, 0.7, 0.6])


def blob_map(n: int, pixel_a: float, centres_a: np.ndarray = CENTRES_A) -> np.ndarray:
    """[z, y, x] float64: the blobs sampled on an n^3 grid of `pixel_a` voxels, centre n // 2."""
    k = (np.arange(n) - n // 2) * pixel_a
    z, y, x = np.meshgrid(k, k, k, indexing="ij")
    out = np.zeros((n, n, n))
    for (cx, cy, cz), s, w in zip(centres_a, SIGMAS_A, WEIGHTS, strict=True):
        out += w * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return out


def write_mrc(path, data: np.ndarray, voxel_a: float, origin=None) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
        mrc.voxel_size = voxel_a
        if origin is not None:
            mrc.header.origin = origin


def read_mrc(path) -> tuple[np.ndarray, float, tuple[float, float, float]]:
    with mrcfile.open(path) as mrc:
        origin = mrc.header.origin
        return (mrc.data.astype(np.float64), float(mrc.voxel_size.x),
                (float(origin.x), float(origin.y), float(origin.z)))


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Geodesic angle between two rotation matrices."""
    return float(np.degrees(np.arccos(np.clip((np.trace(a.T @ b) - 1) / 2, -1, 1))))


# ---------------------------------------------------------------------------------------------
# flip-hand
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [15, 16])
def test_flip_hand_reverses_z_about_the_box_centre_and_keeps_the_header(tmp_path, capsys, n):
    rng = np.random.default_rng(n)
    data = rng.standard_normal((n, n, n))
    src, out = tmp_path / "in.mrc", tmp_path / "out.mrc"
    write_mrc(src, data, 2.25, origin=(12.5, -4.0, 30.0))
    assert main(["flip-hand", str(src), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    flipped, voxel, origin = read_mrc(out)
    # numpy: reverse the z axis ([z, y, x] axis 0). The mirror plane is the box centre n // 2
    # (the rotation centre), so for an even box the reversed planes move by one: plane z reads
    # plane (n - z) mod n, and the outermost plane (z = -n/2, no mirror inside) stays.
    expected = np.flip(data, axis=0)
    if n % 2 == 0:
        expected = np.roll(expected, 1, axis=0)
    np.testing.assert_array_equal(flipped, expected.astype(np.float32))
    c = n // 2
    np.testing.assert_array_equal(flipped[c + 3], data[c - 3].astype(np.float32))
    assert voxel == pytest.approx(2.25)
    assert origin == pytest.approx((12.5, -4.0, 30.0))
    # twice is the identity
    again = tmp_path / "again.mrc"
    assert main(["flip-hand", str(out), "--out", str(again)]) == 0
    np.testing.assert_array_equal(read_mrc(again)[0], data.astype(np.float32))


def test_flip_hand_and_align_refuse_bad_input_in_one_line(tmp_path, capsys):
    good = write_volume(tmp_path / "good.mrc",
                        np.random.default_rng(0).standard_normal((16, 16, 16)))
    flat = write_volume(tmp_path / "flat.mrc",
                        np.random.default_rng(1).standard_normal((16, 16, 12)))
    nan = np.random.default_rng(2).standard_normal((16, 16, 16))
    nan[3, 4, 5] = np.nan
    nan = write_volume(tmp_path / "nan.mrc", nan)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    out = str(tmp_path / "out.mrc")
    for argv in (["flip-hand", "{}", "--out", out], ["align", "{}", str(good), "--out", out],
                 ["align", str(good), "{}", "--out", out]):
        def filled(path, argv=argv):
            return [str(path) if a == "{}" else a for a in argv]

        refused(capsys, filled(tmp_path / "missing.mrc"), "missing.mrc", "no such")
        refused(capsys, filled(flat), "flat.mrc", "not a cubic map")
        refused(capsys, filled(nan), "nan.mrc", "NaN")
        refused(capsys, [*filled(good)[:-1], str(folder)], "--out", "is a folder")
        refused(capsys, [*filled(good)[:-1], str(tmp_path / "nowhere" / "o.mrc")], "--out",
                "does not exist")
    refused(capsys, ["align", str(good), str(good), "--out", out, "--symmetry", "D2h"],
            "--symmetry")
    assert not (tmp_path / "out.mrc").exists()


# ---------------------------------------------------------------------------------------------
# align
# ---------------------------------------------------------------------------------------------


def parse_alignment(text: str) -> tuple[np.ndarray, np.ndarray, bool, float, float]:
    """(R, s in px, flipped, FSC 0.5 A, FSC 0.143 A) from the printed report."""
    number = r"(-?[\d.]+)"
    euler = re.search(rf"rotation \(RELION rot, tilt, psi\): {number} {number} {number}", text)
    shift = re.search(rf"shift \(x, y, z\): {number} {number} {number} px", text)
    flipped = re.search(r"hand flipped: (yes|no)", text)
    res05 = re.search(rf"FSC = 0.5: +(?:beyond )?{number} A", text)
    res0143 = re.search(rf"FSC = 0.143: +(?:beyond )?{number} A", text)
    assert euler and shift and flipped and res05 and res0143, text
    r = euler_to_matrix(torch.tensor([float(v) for v in euler.groups()], dtype=torch.float64))
    return (r.numpy(), np.array([float(v) for v in shift.groups()]), flipped.group(1) == "yes",
            float(res05.group(1)), float(res0143.group(1)))


def test_align_undoes_a_scipy_rotation_and_shift(tmp_path, capsys):
    n, pixel = 32, 2.0
    reference = blob_map(n, pixel)
    q = Rotation.from_euler("ZYZ", [50.0, 65.0, -30.0], degrees=True).as_matrix()  # (x, y, z)
    t = np.array([2.0, -1.5, 1.0])  # pixels (x, y, z)
    # moving(x) = reference(q^T (x - t)) about the centre c, in scipy's [z, y, x] index order
    rev = np.eye(3)[::-1]
    q_zyx, t_zyx, c = rev @ q @ rev, t[::-1], np.full(3, n // 2)
    moving = ndimage.affine_transform(reference, q_zyx.T, offset=c - q_zyx.T @ (c + t_zyx),
                                      order=3, mode="constant")
    ref_path, map_path, out = tmp_path / "ref.mrc", tmp_path / "map.mrc", tmp_path / "out.mrc"
    write_mrc(ref_path, reference, pixel)
    write_mrc(map_path, moving, pixel)
    assert main(["align", str(map_path), str(ref_path), "--out", str(out)]) == 0
    rotation, shift, flipped, res05, _ = parse_alignment(capsys.readouterr().out)
    # aligned(x) = moving(R^T (x - s)) = reference(x) for R = q^T, s = -q^T t
    assert not flipped
    assert angle_deg(rotation, q.T) < 3.0
    assert np.linalg.norm(shift - (-q.T @ t)) < 0.5
    aligned, voxel, _ = read_mrc(out)
    assert aligned.shape == (n, n, n) and voxel == pytest.approx(pixel)
    fsc = compute_fsc(torch.from_numpy(reference), torch.from_numpy(aligned), pixel_size_a=pixel)
    # the blobs (sigma >= 2 px) carry signal to about a quarter of Nyquist
    assert float(fsc.fsc[1 : n // 4 + 1].min()) > 0.9
    assert res05 < 4 * pixel * n / (n // 4) / 2  # the printed resolution says the same


def test_align_resamples_another_grid_and_flips_the_hand_only_when_allowed(tmp_path, capsys):
    n, pixel = 32, 2.5  # the reference's grid
    m, moving_pixel = 44, 1.6  # the map's: another box and pixel size
    reference = blob_map(n, pixel)
    q = Rotation.from_euler("ZYZ", [-120.0, 35.0, 80.0], degrees=True).as_matrix()
    t_a = np.array([-3.0, 4.0, 2.0])
    # the moving map: each blob at q c + t, then mirrored (z reversed), sampled analytically
    centres = (CENTRES_A @ q.T + t_a) * np.array([1.0, 1.0, -1.0])
    ref_path, map_path, out = tmp_path / "ref.mrc", tmp_path / "map.mrc", tmp_path / "out.mrc"
    write_mrc(ref_path, reference, pixel)
    write_mrc(map_path, blob_map(m, moving_pixel, centres), moving_pixel)

    assert main(["align", str(map_path), str(ref_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "resampled onto the grid" in text
    assert not parse_alignment(text)[2]  # the hand is kept without --allow-flip
    kept = compute_fsc(torch.from_numpy(reference), torch.from_numpy(read_mrc(out)[0]),
                       pixel_size_a=pixel)

    assert main(["align", str(map_path), str(ref_path), "--out", str(out), "--allow-flip"]) == 0
    rotation, shift, flipped, _, _ = parse_alignment(capsys.readouterr().out)
    assert flipped
    assert angle_deg(rotation, q.T) < 3.0
    assert np.linalg.norm(shift * pixel - (-q.T @ t_a)) < 0.5 * pixel
    aligned, voxel, _ = read_mrc(out)
    assert aligned.shape == (n, n, n) and voxel == pytest.approx(pixel)
    fsc = compute_fsc(torch.from_numpy(reference), torch.from_numpy(aligned), pixel_size_a=pixel)
    assert float(fsc.fsc[1 : n // 4 + 1].min()) > 0.9
    assert float(kept.fsc[1 : n // 4 + 1].min()) < 0.8  # the wrong hand fits worse


def test_symmetry_equivalent_is_the_group_element_nearest_the_identity():
    group = point_group("D2")
    # D2 in RELION's axes: the identity and half turns about x, y and z (scipy, independently)
    half_turns = [np.eye(3)] + [Rotation.from_rotvec(np.pi * np.eye(3)[i]).as_matrix()
                                for i in range(3)]
    assert all(min(np.abs(group.matrices.numpy() - h).max(axis=(1, 2))) < 1e-9
               for h in half_turns)
    small = Rotation.from_euler("ZYZ", [10.0, 20.0, 5.0], degrees=True).as_matrix()
    s = np.array([1.0, 2.0, 3.0])
    for h in half_turns:
        found = symmetry_equivalent(
            Alignment(torch.from_numpy(h @ small), torch.from_numpy(h @ s), False, 0.9),
            group.matrices)
        assert angle_deg(found.rotation.numpy(), small) < 1e-6
        np.testing.assert_allclose(found.shift_px.numpy(), s, atol=1e-9)


@pytest.mark.parametrize(("box", "pixel"), [(40, 2.0), (64, 1.1), (24, 1.5), (60, 1.5)])
def test_resample_onto_grid_matches_the_map_sampled_there(box, pixel):
    source = torch.from_numpy(blob_map(48, 1.5))
    out = resample_onto_grid(source, 1.5, box, pixel).numpy()
    expected = blob_map(box, pixel)
    if box < 48 * 1.5 / pixel:  # the whole source fits: the grid covers no empty space
        assert np.abs(out - expected).max() < 0.01
    else:  # beyond the source box it reads zero; inside, the map
        inside = np.abs((np.arange(box) - box // 2) * pixel) < 23 * 1.5
        core = np.ix_(inside, inside, inside)
        assert np.abs(out[core] - expected[core]).max() < 0.01


# ---------------------------------------------------------------------------------------------
# open_in_chimerax.cxc
# ---------------------------------------------------------------------------------------------

COMMAND = re.compile(
    r"^(open (?P<open>[\w.]+)"
    r"|volume #(?P<model>\d+) style surface level (?P<level>[-\d.e+]+) "
    r"voxelSize (?P<voxel>[\d.e+]+)(?P<hide> hide)?"
    r"|view|set bgColor white|lighting soft|graphics silhouettes true)$")


def parse_script(path) -> list[tuple[str, float, float, bool]]:
    """(file, level, voxel size, hidden) of every map the script opens, in model order; every
    line must be a comment or one of the ChimeraX commands above."""
    opened, volumes, rest = [], {}, []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = COMMAND.match(line)
        assert match, f"unexpected command: {line!r}"
        if match["open"]:
            opened.append(match["open"])
        elif match["model"]:
            volumes[int(match["model"])] = (float(match["level"]), float(match["voxel"]),
                                            bool(match["hide"]))
        else:
            rest.append(line)
    assert sorted(volumes) == list(range(1, len(opened) + 1))
    assert rest[0] == "view" and "lighting soft" in rest
    return [(name, *volumes[i + 1]) for i, name in enumerate(opened)]


def level_enclosing(data: np.ndarray, volume_a3: float, voxel_a: float) -> float:
    """numpy: the value of the k-th largest voxel, k voxels making up `volume_a3`."""
    k = int(round(volume_a3 / voxel_a**3))
    return float(np.sort(data.ravel())[::-1][k - 1])


def check_script(folder, volume_a3: float) -> list[str]:
    script = parse_script(folder / "open_in_chimerax.cxc")
    names = [name for name, *_ in script]
    assert sorted(names) == sorted(p.name for p in folder.glob("*.mrc"))  # every map, no other
    assert names[0] == "map.mrc"
    for name, level, voxel, hidden in script:
        data, header_voxel, _ = read_mrc(folder / name)
        assert voxel == pytest.approx(header_voxel, rel=1e-5)
        assert level == pytest.approx(level_enclosing(data, volume_a3, voxel), rel=1e-5, abs=1e-9)
        assert hidden == (name != "map.mrc")
    return names


def test_reconstruct_writes_a_chimerax_script_of_its_maps_at_the_mass_level(sim, tmp_path):
    out = tmp_path / "run"
    argv = ["reconstruct", str(sim / "particles.star"), "--out", str(out), *FAST,
            "--box", "24", "--max-freq", "0.3", "--classes", "2", "--mass-kda", "60"]
    assert main(argv) == 0
    names = check_script(out, 60_000 * 1.21)
    assert {"map_fullbox.mrc", "class_01.mrc", "class_02.mrc"} <= set(names)
    # the paths are relative: the moved folder still has every file the script names
    moved = shutil.move(out, tmp_path / "moved")
    assert all((moved / name).is_file() for name in names)
    assert "60 kDa" in (moved / "open_in_chimerax.cxc").read_text()


def test_baseline_writes_a_chimerax_script_at_the_sphere_level(sim, tmp_path):
    out = tmp_path / "pm"
    argv = ["baseline", "projmatch", str(sim / "particles.star"), "--out", str(out),
            "--iterations", "1", "--max-freq", "0.15", "--test-size", "5", "--quiet"]
    assert main(argv) == 0
    diameter = json.loads((out / "config.json").read_text())["particle_diameter_a"]
    assert check_script(out, 0.2 * math.pi / 6 * diameter**3) == ["map.mrc"]


def test_a_mass_that_is_not_positive_is_refused_in_one_line(sim, tmp_path, capsys):
    out = tmp_path / "run"
    for value in ("-5", "0", "nan"):
        refused(capsys, ["reconstruct", str(sim / "particles.star"), "--out", str(out), *FAST,
                         "--mass-kda", value], "mass-kda")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Log axes: tick labels that do not overlap
# ---------------------------------------------------------------------------------------------


def visible_x_tick_labels(ax) -> list:
    """Window boxes of the x tick labels drawn: inside the view, visible, with text."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = sorted(ax.get_xlim())
    boxes = []
    for minor in (False, True):
        locs = ax.xaxis.get_minorticklocs() if minor else ax.xaxis.get_majorticklocs()
        labels = ax.get_xticklabels(minor=minor)
        for loc, label in zip(locs, labels, strict=False):
            if lo <= loc <= hi and label.get_visible() and label.get_text():
                boxes.append(label.get_window_extent(renderer))
    return boxes


def assert_clean_log_axes(fig) -> None:
    log_axes = [ax for ax in fig.axes if ax.get_xscale() == "log"]
    assert log_axes
    for ax in log_axes:
        boxes = visible_x_tick_labels(ax)
        assert len(boxes) >= 2, ax.get_xlim()  # labelled, not merely emptied
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (ax.get_xlim(), a, b)


def metrics_over(first: float, last: float, points: int = 60) -> list[dict]:
    """metrics.csv rows from gradient evaluation 0 (plotted at 1) to `last`, the objective from
    `first` on, the cutoff changing four times."""
    counts = [0, *np.geomspace(first, last, points).round()]
    return [{"gradient_evaluations": g, "test_nll": 300.0 - 10 * math.log1p(g),
             "minibatch_objective": None if g == 0 else 600.0 - 30 * math.log(g),
             "cutoff_resolution_a": 80.0 - 10 * min(4, int(5 * i / len(counts)))}
            for i, g in enumerate(counts)]


@pytest.mark.parametrize(("first", "last"), [(200, 5400), (100, 15_000), (300, 3000),
                                             (1000, 1.1e6), (100, 2e8)])
def test_report_log_axes_have_no_overlapping_tick_labels(first, last):
    from cryostoch.evaluate.plots import _pyplot, report_figure

    plt = _pyplot()
    fig = report_figure(torch.rand(16, 16, 16), metrics_over(first, last), title="t")
    try:
        fig.savefig(io.BytesIO(), format="png")  # the layout of the PNG written
        assert_clean_log_axes(fig)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("last", [5000, 499_000, 2_500_000])
def test_experiment_nll_figure_has_no_overlapping_tick_labels(tmp_path, last):
    from cryostoch.engine.experiment import MethodRun
    from cryostoch.evaluate.plots import _pyplot, nll_figure

    plt = _pyplot()
    runs = [MethodRun(name, tmp_path, metrics_over(100, last * scale), torch.zeros(4, 4, 4),
                      1.0, int(last * scale), None)
            for name, scale in (("sgd", 1.0), ("em", 0.5))]
    fig = nll_figure(runs, "t")
    try:
        fig.savefig(io.BytesIO(), format="png")
        assert_clean_log_axes(fig)
    finally:
        plt.close(fig)

