"""Centred unitary FFTs, frequency grids, masks, Fourier crop/pad, oversampled spectra."""

from cryostoch.fourier.grids import (
    HalfPlaneCoefficients,
    ball_mask,
    centred_frequencies,
    disc_mask,
    fft2_grid,
    fft3_grid,
    half_plane_coefficients,
    radial_index,
    real_space_ball,
    real_space_disc,
    rfft2_grid,
    rfft3_grid,
)
from cryostoch.fourier.resample import low_pass, pad_real_space, resample_images, resample_volume
from cryostoch.fourier.spectrum import (
    PrunedDft,
    SpectrumLayout,
    dft_matrix,
    oversampled_volume_spectrum,
)
from cryostoch.fourier.transforms import (
    fft2c,
    fft3c,
    ifft2c,
    ifft3c,
    irfft2c,
    irfft3c,
    rfft2c,
    rfft3c,
)

__all__ = [
    "HalfPlaneCoefficients",
    "PrunedDft",
    "SpectrumLayout",
    "ball_mask",
    "centred_frequencies",
    "dft_matrix",
    "disc_mask",
    "fft2_grid",
    "fft2c",
    "fft3_grid",
    "fft3c",
    "half_plane_coefficients",
    "ifft2c",
    "ifft3c",
    "irfft2c",
    "irfft3c",
    "low_pass",
    "oversampled_volume_spectrum",
    "pad_real_space",
    "radial_index",
    "real_space_ball",
    "real_space_disc",
    "resample_images",
    "resample_volume",
    "rfft2_grid",
    "rfft3_grid",
    "rfft2c",
    "rfft3c",
]
