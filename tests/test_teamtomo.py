"""Our CTF and central-slice extraction against independent implementations from teamtomo
(BSD-3, test-only dependencies in pyproject's `test` extra): `torch-ctf` and
`torch-fourier-slice` (both 0.6.0 when written).

Conventions, read from their sources and applied explicitly here:

torch-ctf `calculate_ctf_2d`
- defocus and astigmatism in micrometres: defocus = (dU + dV) / 2, astigmatism = (dU - dV) / 2
  (it takes sqrt(astigmatism), so it needs dU >= dV; RELION's dU < dV is the same CTF with
  the two swapped and the angle turned by 90 degrees);
- the astigmatism angle is RELION's rlnDefocusAngle unchanged: measured from the x axis
  (kx, the rfft's half axis) towards y; its docstring's "0 places defocus_u along the y-axis"
  does not describe what the code does (the numbers below agree with RELION's formula for
  the angle as given, and disagree by O(1) for -angle or angle + 90);
- rfft=True, fftshift=True gives our `rfft2c` layout (N, N//2 + 1): ky centred at row N//2,
  kx = 0 .. N/2; its frequencies are in 1/A from the pixel size; no B-factor;
- it works in float32 and uses CODATA constants for the electron wavelength (RELION's formula
  agrees to 7e-6 relative at 300 kV), so phases of up to ~100 rad at Nyquist agree to ~1e-3.

torch-fourier-slice `extract_central_slices_rfft_3d`
- takes an fftshifted rfft volume (kz, ky centred, kx = 0 .. N/2): our `rfft3c` layout;
- its rotation matrices act on xyz column vectors and map the slice plane's (kx, ky, 0) to
  the volume frequency R (kx, ky, 0) (active). Ours reads V_hat(A^T (kx, ky, 0)) for RELION's
  A, so R = A^T; with R = A (a transposed rotation) the slices differ by O(1);
- it samples with trilinear interpolation (as ours, oversampling 1), conjugating reads from
  the kx < 0 half; it casts coordinates to float32, so the spectrum is given as complex64.
"""

from __future__ import annotations

import pytest
import torch

from cryostoch.fourier.grids import rfft2_grid
from cryostoch.fourier.transforms import rfft3c
from cryostoch.geometry.rotations import euler_to_matrix
from cryostoch.operators import CtfParameters, evaluate_ctf, extract_slices

torch_ctf = pytest.importorskip("torch_ctf")
torch_fourier_slice = pytest.importorskip("torch_fourier_slice")

F64 = torch.float64


@pytest.mark.parametrize(
    ("defocus_u_a", "defocus_v_a", "angle_deg", "phase_shift_deg", "pixel_a"),
    [(15000.0, 12000.0, 30.0, 0.0, 1.5),
     (9000.0, 8200.0, 117.0, 35.0, 2.0),
     (21000.0, 24000.0, -52.0, 0.0, 1.2)],  # dU < dV: given to torch-ctf swapped, angle + 90
)
def test_ctf_matches_torch_ctf(defocus_u_a, defocus_v_a, angle_deg, phase_shift_deg, pixel_a):
    n = 48
    ctf = CtfParameters.from_values(
        1, defocus_u_a=defocus_u_a, defocus_v_a=defocus_v_a, defocus_angle_deg=angle_deg,
        voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1,
        phase_shift_deg=phase_shift_deg)
    ky, kx = rfft2_grid(n)
    ours = evaluate_ctf(ctf, (kx / (n * pixel_a))[None], (ky / (n * pixel_a))[None])[0]

    def theirs(angle):
        du, dv = max(defocus_u_a, defocus_v_a), min(defocus_u_a, defocus_v_a)
        return torch_ctf.calculate_ctf_2d(
            defocus=(du + dv) / 2e4, astigmatism=(du - dv) / 2e4, astigmatism_angle=angle,
            voltage=300.0, spherical_aberration=2.7, amplitude_contrast=0.1,
            phase_shift=phase_shift_deg, pixel_size=pixel_a, image_shape=(n, n), rfft=True,
            fftshift=True).to(F64)

    angle = angle_deg if defocus_u_a >= defocus_v_a else angle_deg + 90.0
    reference = theirs(angle)
    assert reference.shape == ours.shape
    assert float((reference - ours).abs().max()) < 3e-3
    # the comparison can tell a flipped or rotated astigmatism angle apart
    for wrong in (-angle, angle + 90.0):
        assert float((theirs(wrong) - ours).abs().max()) > 0.5


def test_slice_extraction_matches_torch_fourier_slice():
    n = 16
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(n, n, n, generator=g, dtype=F64)  # any real volume: both interpolate
    spectrum = rfft3c(volume)  # the same array
    euler = torch.tensor([[37.0, 61.0, -113.0], [200.0, 20.0, 45.0], [-75.0, 128.0, 10.0]],
                         dtype=F64)
    a = euler_to_matrix(euler)
    ky, kx = rfft2_grid(n)
    inside = kx * kx + ky * ky <= (n / 2 - 1) ** 2  # both read inside the array there
    ours = extract_slices(spectrum, a, kx[inside], ky[inside], 1)

    def theirs(rotations):
        out = torch_fourier_slice.extract_central_slices_rfft_3d(
            volume_rfft=spectrum.to(torch.complex64), rotation_matrices=rotations)
        assert out.shape == (3, n, n // 2 + 1)
        return out[:, inside].to(torch.complex128)

    scale = float(ours.abs().max())
    assert float((theirs(a.transpose(-1, -2)) - ours).abs().max()) < 1e-5 * scale
    # a transposed rotation is caught
    assert float((theirs(a) - ours).abs().max()) > 0.3 * scale
