"""Pose errors against the truth in the estimate's own frame (evaluate.pose_error) and
`cryostoch pose-error`.

The estimated poses are built here from true ones by the relations the module derives (a
global rotation Q, the mirror M A Q M, a symmetry mate, a map translation) with noise of known
size: the expected errors are those of the noise, measured independently of the code."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryostoch.cli.main import main
from cryostoch.evaluate.pose_error import (
    MIRROR_Z,
    fit_frame,
    frame_modes,
    nearest_frame_angles_deg,
    pose_errors,
)
from cryostoch.geometry.rotations import (
    euler_to_matrix,
    geodesic_angle_rad,
    matrix_to_euler,
    random_rotations,
    rotvec_to_matrix,
)
from cryostoch.geometry.symmetry import point_group

N = 1500
NOISE_DEG = 3.0


def poses(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    true = random_rotations(N, g)
    q = random_rotations(1, g)[0]
    noise = rotvec_to_matrix(torch.randn(N, 3, generator=g, dtype=torch.float64)
                             * math.radians(NOISE_DEG))
    return g, true, q, noise


def noise_angles_deg(noise: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(geodesic_angle_rad(noise, torch.eye(3, dtype=torch.float64)))


@pytest.mark.parametrize("mirrored", [False, True])
def test_the_frame_and_hand_are_recovered_and_errors_are_the_noise(mirrored):
    _, true, q, noise = poses(1)
    m = MIRROR_Z
    est = (m @ true @ q @ m if mirrored else true @ q) @ noise
    fit = fit_frame(est, true)
    assert fit.mirrored == mirrored
    assert math.degrees(float(geodesic_angle_rad(fit.rotation, q))) < 0.5
    errors = pose_errors(est, true, torch.zeros(N, 2), torch.zeros(N, 2), fit)
    np.testing.assert_allclose(errors.angle_deg.numpy(), noise_angles_deg(noise).numpy(),
                               atol=0.5)
    assert errors.share_within(20) == 1.0


def test_a_confused_pseudo_threefold_shows_as_a_second_frame_and_c3_absorbs_it():
    """20% of the particles take the pose of the truth's 120-degree mate: a second frame at
    120 deg from the first holds them; judged modulo C3 every particle is right."""
    g, true, q, noise = poses(2)
    c3 = point_group("C3").matrices
    wrong = torch.rand(N, generator=g) < 0.2
    est = true @ q @ noise
    est[wrong] = (true[wrong] @ c3[1] @ q) @ noise[wrong]
    modes = frame_modes(est, true)
    assert len(modes) == 2
    assert modes[0].inlier_share == pytest.approx(1 - float(wrong.double().mean()), abs=0.01)
    assert modes[1].inlier_share == pytest.approx(float(wrong.double().mean()), abs=0.01)
    between = math.degrees(float(geodesic_angle_rad(modes[0].rotation, modes[1].rotation)))
    assert between == pytest.approx(120.0, abs=1.0)
    assert not bool((modes[0].inliers & modes[1].inliers).any())
    np.testing.assert_allclose(nearest_frame_angles_deg(est, true, modes).numpy(),
                               noise_angles_deg(noise).numpy(), atol=0.5)
    c1 = pose_errors(est, true, torch.zeros(N, 2), torch.zeros(N, 2), modes[0])
    assert c1.share_within(20) == pytest.approx(1 - float(wrong.double().mean()), abs=0.01)
    fit = fit_frame(est, true, c3)
    c3_errors = pose_errors(est, true, torch.zeros(N, 2), torch.zeros(N, 2), fit, c3)
    np.testing.assert_allclose(c3_errors.angle_deg.numpy(), noise_angles_deg(noise).numpy(),
                               atol=0.5)


def test_a_map_translation_is_fitted_and_the_shift_noise_remains():
    g, true, q, _ = poses(3)
    est = true @ q
    u = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    true_shifts = torch.randn(N, 2, generator=g, dtype=torch.float64) * 3
    shift_noise = torch.randn(N, 2, generator=g, dtype=torch.float64) * 0.2
    est_shifts = true_shifts + (est[:, :2, :] @ u) + shift_noise
    errors = pose_errors(est, true, est_shifts, true_shifts, fit_frame(est, true))
    np.testing.assert_allclose(errors.translation_px.numpy(), u.numpy(), atol=0.03)
    np.testing.assert_allclose(errors.shift_px.numpy(), shift_noise.norm(dim=1).numpy(),
                               atol=0.05)


def test_bad_arguments_are_refused():
    _, true, _, _ = poses(4)
    with pytest.raises(ValueError, match="hand"):
        fit_frame(true, true, hand="left")
    with pytest.raises(ValueError, match="one N"):
        fit_frame(true[:10], true[:11])


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def write_star(path, euler_deg: np.ndarray, origins_a: np.ndarray, rows: np.ndarray) -> None:
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"],
                           "rlnImagePixelSize": [2.0], "rlnImageSize": [32],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1]})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in rows],
        "rlnDefocusU": 15000.0, "rlnDefocusV": 15000.0, "rlnDefocusAngle": 0.0,
        "rlnAngleRot": euler_deg[:, 0], "rlnAngleTilt": euler_deg[:, 1],
        "rlnAnglePsi": euler_deg[:, 2], "rlnOriginXAngst": origins_a[:, 0],
        "rlnOriginYAngst": origins_a[:, 1], "rlnOpticsGroup": 1})
    starfile.write({"optics": optics, "particles": particles}, path)


def test_cli_matches_particles_by_image_and_reports(tmp_path, capsys):
    n = 400
    _, true, q, noise = poses(5)
    true, noise = true[:n], noise[:n]
    m = MIRROR_Z
    est = m @ true @ q @ m @ noise
    rows = np.arange(n)
    write_star(tmp_path / "true.star", matrix_to_euler(true).numpy(), np.zeros((n, 2)), rows)
    keep = rows[::-1][: n - 50]  # a reversed subset: matching is by image, not by row
    write_star(tmp_path / "est.star", matrix_to_euler(est).numpy()[keep], np.zeros((len(keep), 2)),
               keep)
    out = tmp_path / "errors"
    assert main(["pose-error", str(tmp_path / "est.star"), str(tmp_path / "true.star"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "350 particles matched" in printed and "mirrored" in printed
    summary = json.loads((out / "pose_error.json").read_text())
    assert summary["matched"] == 350 and summary["mirrored"] is True
    assert summary["within_deg"]["20"] == 1.0
    expected = float(noise_angles_deg(noise[torch.from_numpy(keep.copy())]).median())
    assert summary["angle_error_deg_percentiles"]["50"] == pytest.approx(expected, abs=0.3)
    table = pd.read_csv(out / "pose_errors.csv")
    assert len(table) == 350 and set(table["mode"]) <= {0, 1}  # 0: beyond 10 deg of frame 1
    assert (table["mode"] == 1).mean() == pytest.approx(summary["within_deg"]["10"], abs=1e-3)
    assert table["image"].iloc[0].startswith("000400@") and table["image"].iloc[0].endswith(
        "stack.mrcs")
    euler_q = euler_to_matrix(torch.tensor(summary["frame_euler_deg"], dtype=torch.float64))
    assert math.degrees(float(geodesic_angle_rad(euler_q, q))) < 0.5


def test_cli_refuses_files_that_share_no_particles(tmp_path, capsys):
    _, true, _, _ = poses(6)
    euler = matrix_to_euler(true[:20]).numpy()
    write_star(tmp_path / "a.star", euler, np.zeros((20, 2)), np.arange(20))
    write_star(tmp_path / "b.star", euler, np.zeros((20, 2)), np.arange(100, 120))
    assert main(["pose-error", str(tmp_path / "a.star"), str(tmp_path / "b.star")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only 0 of its 20 particles" in err[0]
    assert main(["pose-error", str(tmp_path / "a.star"), str(tmp_path / "a.star"),
                 "--symmetry", "Cs"]) == 2
    assert "--symmetry" in capsys.readouterr().err
    for option, value in (("--inlier-deg", "0"), ("--modes", "0")):
        assert main(["pose-error", str(tmp_path / "a.star"), str(tmp_path / "a.star"),
                     option, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and option in err[0]
    blocks = starfile.read(tmp_path / "a.star", always_dict=True)
    blocks["particles"] = blocks["particles"].drop(
        columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    starfile.write(blocks, tmp_path / "no_poses.star")
    assert main(["pose-error", str(tmp_path / "no_poses.star"), str(tmp_path / "a.star")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_poses.star" in err[0] and "has no poses" in err[0]
