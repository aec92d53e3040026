"""How far the CTF moves signal, and what a box can hold: against the phase's derivative, a
real-space point spread function and the closed form without Cs."""

import math

import numpy as np
import pytest
import torch

from cryostoch.operators.ctf import (
    CtfParameters,
    box_limits,
    ctf_delocalisation_a,
    evaluate_ctf,
)


def ctf_of(defocus_a: float, cs_mm: float = 2.7, kv: float = 300.0, n: int = 1,
           astigmatism_a: float = 0.0) -> CtfParameters:
    return CtfParameters.from_values(n, defocus_u_a=defocus_a + astigmatism_a,
                                     defocus_v_a=defocus_a - astigmatism_a, defocus_angle_deg=30.0,
                                     voltage_kv=kv, spherical_aberration_mm=cs_mm,
                                     amplitude_contrast=0.1)


def wavelength_a(kv: float) -> float:  # written out here, not the package's
    volts = kv * 1e3
    return 12.2643247 / math.sqrt(volts * (1 + 0.978466e-6 * volts))


def test_delocalisation_is_the_phase_gradient_over_two_pi():
    """|d gamma / dk| / 2 pi by central differences of RELION's phase (written out here),
    along the larger defocus of an astigmatic CTF."""
    defocus, astig, cs = 25_000.0, 800.0, 2.7
    lam, cs_a = wavelength_a(300.0), cs * 1e7
    k = torch.linspace(0.005, 0.25, 50, dtype=torch.float64)
    dz = defocus + astig

    def phase(kk):
        return -math.pi * lam * dz * kk**2 + math.pi / 2 * cs_a * lam**3 * kk**4

    h = 1e-7
    expected = ((phase(k + h) - phase(k - h)) / (2 * h)).abs() / (2 * math.pi)
    got = ctf_delocalisation_a(ctf_of(defocus, cs, astigmatism_a=astig), k)[0]
    assert torch.allclose(got, expected, rtol=1e-6)


def test_delocalisation_is_where_a_point_source_lands_in_real_space():
    """A point imaged through the package's CTF, restricted to a Gaussian band of frequencies
    around k0: its image is a ring, at the radius the delocalisation gives (numpy's FFT)."""
    n, pixel, defocus, k0, width = 512, 1.0, 60_000.0, 0.1, 0.015
    freqs = np.fft.fftfreq(n, d=pixel)
    fx, fy = np.meshgrid(freqs, freqs, indexing="xy")
    ctf = evaluate_ctf(ctf_of(defocus, cs_mm=0.01), torch.from_numpy(fx)[None],
                       torch.from_numpy(fy)[None])[0].numpy()
    band = np.exp(-0.5 * ((np.hypot(fx, fy) - k0) / width) ** 2)
    image = np.fft.fftshift(np.abs(np.fft.ifft2(ctf * band)) ** 2)
    y, x = np.indices(image.shape) - n // 2
    ring = np.hypot(x, y).astype(int).ravel()
    profile = np.bincount(ring, image.ravel())[:n // 2] / np.bincount(ring)[:n // 2]
    radius = np.arange(10, n // 2)  # the band's own ringing sits at the centre
    # the mean radius: the ring is modulated by fringes (a sine is two opposite chirps)
    ring_a = pixel * float((radius * profile[10:]).sum() / profile[10:].sum())
    expected = float(ctf_delocalisation_a(ctf_of(defocus, cs_mm=0.01),
                                          torch.tensor([k0], dtype=torch.float64))[0, 0])
    assert expected == pytest.approx(wavelength_a(300.0) * defocus * k0, rel=1e-3)
    assert ring_a == pytest.approx(expected, rel=0.02)


def test_box_limits_follow_the_closed_form_without_cs():
    """With Cs = 0 the delocalisation is lambda dz k, so the particle stays whole in the box
    up to k = (box - diameter) / (2 lambda dz) and the CTF aliases past k = box / (2 lambda dz)."""
    box, pixel, diameter = 64, 3.5, 150.0
    defocus = np.array([20_000.0, 30_000.0, 40_000.0, 50_000.0, 60_000.0])  # median 40,000
    ctf = CtfParameters.from_values(5, defocus_u_a=torch.from_numpy(defocus),
                                    defocus_v_a=torch.from_numpy(defocus - 100.0),
                                    defocus_angle_deg=0.0, voltage_kv=200.0,
                                    spherical_aberration_mm=0.0, amplitude_contrast=0.1)
    limits = box_limits(ctf, box, pixel, diameter, samples=20_000)
    lam = wavelength_a(200.0)
    inside = 2 * lam * 40_000.0 / (box * pixel - diameter)
    aliasing = 2 * lam * 40_000.0 / (box * pixel)
    assert limits.particle_inside_a == pytest.approx(inside, rel=2e-3)
    assert limits.aliasing_a == pytest.approx(aliasing, rel=2e-3)
    assert limits.defocus_a == 40_000.0


def test_box_limits_at_the_extremes():
    """Close to focus nothing leaves a big box up to Nyquist; a particle as wide as the box
    loses its rim at once."""
    near_focus = box_limits(ctf_of(2_000.0, n=3), 256, 1.0, 100.0)
    assert near_focus.particle_inside_a == 2.0 and near_focus.aliasing_a == 2.0
    filled = box_limits(ctf_of(20_000.0, n=3), 64, 2.0, 128.0)
    assert filled.particle_inside_a == math.inf and filled.aliasing_a < math.inf
