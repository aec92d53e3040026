"""Fourier primitives against numpy's FFT, Parseval and analytic cases."""

import numpy as np
import pytest
import torch

from cryostoch.fourier import (
    PrunedDft,
    SpectrumLayout,
    fft2c,
    fft3c,
    half_plane_coefficients,
    ifft2c,
    ifft3c,
    irfft2c,
    irfft3c,
    low_pass,
    oversampled_volume_spectrum,
    resample_images,
    resample_volume,
    rfft2c,
    rfft3c,
)

gen = torch.Generator().manual_seed(1)


def test_centred_fft_matches_numpy_and_is_unitary():
    x = torch.randn(3, 12, 12, generator=gen, dtype=torch.float64)
    ref = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    np.testing.assert_allclose(fft2c(x).numpy(), ref, atol=1e-12)
    assert torch.allclose(x.pow(2).sum(), fft2c(x).abs().pow(2).sum())
    assert torch.allclose(ifft2c(fft2c(x)).real, x)
    v = torch.randn(10, 10, 10, generator=gen, dtype=torch.float64)
    assert torch.allclose(v.pow(2).sum(), fft3c(v).abs().pow(2).sum())
    assert torch.allclose(ifft3c(fft3c(v)).real, v)


def test_rfft_layout_is_the_right_half_of_the_full_transform():
    x = torch.randn(2, 16, 16, generator=gen, dtype=torch.float64)
    full, half = fft2c(x), rfft2c(x)
    assert torch.allclose(half[..., :8], full[..., :, 8:])  # kx = 0 .. N/2-1
    # kx = N/2 (Nyquist) is the conjugate twin of the full transform's kx = -N/2 column
    assert torch.allclose(half[..., 1:, 8], full[..., 1:, 0].flip(-1).conj())
    assert torch.allclose(irfft2c(half, 16), x)
    v = torch.randn(12, 12, 12, generator=gen, dtype=torch.float64)
    assert torch.allclose(rfft3c(v)[..., :6], fft3c(v)[..., 6:])
    assert torch.allclose(irfft3c(rfft3c(v), 12), v)


def test_centre_convention_delta_at_box_centre_has_flat_real_spectrum():
    x = torch.zeros(8, 8, dtype=torch.float64)
    x[4, 4] = 1.0  # the box centre N//2 is the origin
    spectrum = fft2c(x)
    assert torch.allclose(spectrum, torch.full_like(spectrum, 1 / 8))


@pytest.mark.parametrize("radius", [3.0, 6.4, 10.24])
def test_half_plane_weights_give_parseval_of_band_limited_image(radius):
    n = 32
    x = torch.randn(n, n, generator=gen, dtype=torch.float64)
    band = low_pass(x, radius, ndim=2)
    coeffs = half_plane_coefficients(n, radius)
    rows, cols = coeffs.rfft_indices()
    spectrum = rfft2c(band)[rows, cols]
    assert torch.allclose((coeffs.weights * spectrum.abs() ** 2).sum(), band.pow(2).sum())
    # degrees of freedom = number of full-disc coefficients (an independent count)
    k = torch.arange(-n // 2, n // 2, dtype=torch.float64)
    full_count = int((k[:, None] ** 2 + k[None, :] ** 2 <= radius**2).sum())
    assert coeffs.degrees_of_freedom == full_count


def test_half_plane_coefficient_count_of_paper_configuration():
    # box 128 at 10% of Nyquist: 65 half-plane coefficients (DESIGN.md)
    assert half_plane_coefficients(128, 6.4).n_points == 65


def test_resample_preserves_constants_and_band_limited_content():
    img = torch.ones(2, 32, 32, dtype=torch.float64) * 3.0
    assert torch.allclose(resample_images(img, 16), torch.full((2, 16, 16), 3.0, dtype=img.dtype))
    assert torch.allclose(resample_images(img, 48), torch.full((2, 48, 48), 3.0, dtype=img.dtype))
    vol = low_pass(torch.randn(16, 16, 16, generator=gen, dtype=torch.float64), 5, ndim=3)
    up = resample_volume(vol, 32)
    back = resample_volume(up, 16)
    assert torch.allclose(back, vol, atol=1e-12)
    # upsampled values at even voxels coincide with the original (band-limited interpolation)
    assert torch.allclose(up[::2, ::2, ::2], vol, atol=1e-12)


@pytest.mark.parametrize("oversampling", [1, 2, 3])
def test_pruned_dft_equals_padded_fft(oversampling):
    n = 16
    v = torch.randn(n, n, n, generator=gen, dtype=torch.float64)
    layout = SpectrumLayout(n, 4.0, oversampling)
    pruned = PrunedDft.create(layout, dtype=torch.float64).volume(v)
    padded, _ = oversampled_volume_spectrum(v, 4.0, oversampling)
    assert torch.allclose(pruned, padded, atol=1e-12)
    images = torch.randn(3, n, n, generator=gen, dtype=torch.float64)
    h = layout.half_width
    blocks = PrunedDft.create(layout, dtype=torch.float64).images(images)
    if oversampling == 1:
        c = n // 2
        assert torch.allclose(blocks, rfft2c(images)[:, c - h : c + h + 1, : h + 1], atol=1e-12)
    # exact grid points of an oversampled block equal the plain DFT
    c = n // 2
    ref = rfft2c(images)[:, c - 4 : c + 5, :5]
    assert torch.allclose(
        blocks[
            :,
            h - 4 * oversampling : h + 4 * oversampling + 1 : oversampling,
            : 4 * oversampling + 1 : oversampling,
        ],
        ref,
        atol=1e-12,
    )


def test_pruned_dft_gradient_is_its_adjoint():
    n = 8
    layout = SpectrumLayout(n, 2.0, 2)
    dft = PrunedDft.create(layout, dtype=torch.float64)
    v = torch.randn(n, n, n, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: torch.view_as_real(dft.volume(x)), (v,))
