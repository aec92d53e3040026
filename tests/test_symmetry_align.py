"""Finding a map's symmetry axes (cryostoch.evaluate.symmetry, `cryostoch symmetry`) on Gaussian
blob maps whose symmetry, position and orientation are known analytically."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch

from cryostoch.cli.main import main as cli_main
from cryostoch.evaluate.symmetry import align_symmetry, centre_of_mass_px, masked_correlation
from cryostoch.evaluate.transform import shift_volume, soft_sphere_mask
from cryostoch.geometry import euler_to_matrix, point_group, random_rotations
from test_symmetry import blobs

F64 = torch.float64
N, SIGMA = 32, 2.0
CENTRES = torch.tensor([[7.0, 3.0, 2.0], [-2.0, 5.0, 6.0], [3.0, -1.0, -3.0]], dtype=F64)
SHIFT = torch.tensor([1.5, -2.0, 1.0], dtype=F64)


def d2_orbit() -> torch.Tensor:
    group = point_group("D2")
    return (group.matrices[:, None] @ CENTRES[..., None])[..., 0].reshape(-1, 3)


def rotated_d2_map(q: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """The D2 orbit map rotated by `q` (blob centres q c) and shifted by SHIFT, with noise."""
    g = torch.Generator().manual_seed(seed)
    clean = blobs(N, d2_orbit() @ q.T + SHIFT, SIGMA)
    return (clean + noise * torch.randn(N, N, N, generator=g, dtype=F64)).float()


def test_align_symmetry_finds_the_d2_axes_of_a_rotated_noisy_map():
    q = random_rotations(1, torch.Generator().manual_seed(3))[0]
    fit = align_symmetry(rotated_d2_map(q, 0.05, seed=1), "d2")
    # the map's 2-folds are q x, q y, q z; R must put each on a standard axis (up to sign)
    m = fit.rotation @ q
    assert float(m.abs().amax(dim=1).min()) > math.cos(math.radians(3.0))
    assert fit.correlation > 0.95
    assert float(fit.element_correlations.min()) > 0.9
    assert torch.allclose(fit.centring_shift_px, -SHIFT, atol=0.3)
    # aligned(x) = V_c(R^T x): the blobs sit at R q c, an analytic map to compare with
    expected = blobs(N, d2_orbit() @ m.T, SIGMA)
    mask = soft_sphere_mask(N, 0.4 * N, edge_px=3, dtype=F64)
    assert float(masked_correlation(fit.aligned, expected, mask)) > 0.95
    assert fit.aligned.shape == fit.symmetrized.shape == (N, N, N)


def test_align_symmetry_scores_an_asymmetric_map_clearly_lower():
    g = torch.Generator().manual_seed(2)
    centres = 5.0 * torch.randn(12, 3, generator=g, dtype=F64)
    asymmetric = align_symmetry(blobs(N, centres, SIGMA).float(), "D2")
    symmetric = align_symmetry(rotated_d2_map(torch.eye(3, dtype=F64), 0.0, seed=0), "D2")
    assert symmetric.correlation > 0.98
    assert asymmetric.correlation < symmetric.correlation - 0.15


def test_align_symmetry_c1_is_the_identity_with_correlation_one():
    q = euler_to_matrix(torch.tensor([10.0, 20.0, 30.0], dtype=F64))
    volume = rotated_d2_map(q, 0.05, seed=4)
    fit = align_symmetry(volume, "C1")
    assert torch.equal(fit.rotation, torch.eye(3, dtype=F64))
    assert fit.correlation == pytest.approx(1.0, abs=1e-9)
    assert fit.element_correlations.shape == (1,)


def test_centre_of_mass_and_fourier_shift_of_a_blob():
    t = torch.tensor([2.25, -1.5, 3.0], dtype=F64)
    volume = blobs(N, t[None], SIGMA) + 0.3  # a solvent level that must not pull the centre
    assert torch.allclose(centre_of_mass_px(volume), t, atol=1e-3)
    s = torch.tensor([-2.25, 1.0, -0.5], dtype=F64)
    moved = shift_volume(blobs(N, t[None], SIGMA), s)
    assert torch.allclose(moved, blobs(N, (t + s)[None], SIGMA), atol=1e-6)


def test_masked_correlation_is_the_weighted_pearson_coefficient():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 12, 12, 12, generator=g, dtype=F64)
    mask = soft_sphere_mask(12, 4.0, edge_px=0, dtype=F64)
    inside = mask.bool()
    expected = np.corrcoef(a[inside].numpy(), b[inside].numpy())[0, 1]
    assert float(masked_correlation(a, b, mask)) == pytest.approx(expected, rel=1e-12)
    assert float(masked_correlation(a, 3 * a - 1, mask)) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def write_mrc(path, volume, voxel_size):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume.numpy(), dtype=np.float32))
        mrc.voxel_size = voxel_size


@pytest.mark.parametrize("group", ["X2", "D2h", "I5"])
def test_cli_symmetry_rejects_a_bad_group_in_one_line(tmp_path, capsys, group):
    path = tmp_path / "map.mrc"
    write_mrc(path, torch.zeros(16, 16, 16), 2.0)
    out = tmp_path / "aligned.mrc"
    assert cli_main(["symmetry", str(path), "--group", group, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("cryostoch: error: --group:") and repr(group) in err
    assert not out.exists()


def test_cli_symmetry_writes_the_aligned_and_symmetrized_maps(tmp_path, capsys):
    q = euler_to_matrix(torch.tensor([30.0, 50.0, -70.0], dtype=F64))
    path = tmp_path / "map.mrc"
    write_mrc(path, rotated_d2_map(q, 0.02, seed=6), 2.5)
    out, sym = tmp_path / "aligned.mrc", tmp_path / "sym.mrc"
    code = cli_main(["symmetry", str(path), "--group", "D2", "--out", str(out),
                     "--symmetrized-out", str(sym)])
    text = capsys.readouterr().out
    assert code == 0
    assert "RELION Euler" in text and "symmetrised copy" in text
    correlation = float(text.split("symmetrised copy: ")[1].split()[0])
    assert correlation > 0.95
    with mrcfile.open(out) as mrc:
        aligned = torch.from_numpy(mrc.data.copy())
        assert float(mrc.voxel_size.x) == pytest.approx(2.5)
    with mrcfile.open(sym) as mrc:
        symmetrized = torch.from_numpy(mrc.data.copy())
    mask = soft_sphere_mask(N, 0.4 * N, edge_px=3, dtype=F64)
    assert float(masked_correlation(aligned, symmetrized, mask)) == pytest.approx(correlation,
                                                                                abs=0.02)
    # bad map: one line naming the file
    assert cli_main(["symmetry", str(tmp_path / "none.mrc"), "--group", "C2",
                     "--out", str(tmp_path / "x.mrc")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.mrc" in err
