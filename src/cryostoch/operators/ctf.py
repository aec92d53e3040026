"""Contrast transfer function, RELION's formula (see docs/conventions.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class CtfParameters:
    """Per-particle CTF parameters; every field is a 1-D tensor of the same length.

    Units: Angstrom for defocus, degrees for angles, kV, mm for Cs, A^2 for the B-factor.
    """

    defocus_u_a: Tensor
    defocus_v_a: Tensor
    defocus_angle_deg: Tensor
    voltage_kv: Tensor
    spherical_aberration_mm: Tensor
    amplitude_contrast: Tensor
    phase_shift_deg: Tensor
    bfactor_a2: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        lengths = {f.name: getattr(self, f.name).shape for f in fields(self)}
        shapes = set(lengths.values())
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"CtfParameters fields must be 1-D of one length, got {lengths}")

    def __len__(self) -> int:
        return int(self.defocus_u_a.shape[0])

    def index(self, indices: Tensor | slice | list[int]) -> CtfParameters:
        """The parameters of a subset of particles."""
        return CtfParameters(**{f.name: getattr(self, f.name)[indices] for f in fields(self)})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        return CtfParameters(
            **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        )

    @staticmethod
    def concatenate(parts: list[CtfParameters]) -> CtfParameters:
        return CtfParameters(
            **{
                f.name: torch.cat([getattr(p, f.name) for p in parts])
                for f in fields(CtfParameters)
            }
        )

    @staticmethod
    def from_values(n: int, **values: float | Tensor) -> CtfParameters:
        """Broadcast scalars (or tensors) to `n` particles; unspecified optional fields get
        RELION's defaults (no phase shift, no B-factor, scale 1)."""
        defaults = {"phase_shift_deg": 0.0, "bfactor_a2": 0.0, "scale": 1.0}
        merged = {**defaults, **values}
        out = {}
        for f in fields(CtfParameters):
            if f.name not in merged:
                raise ValueError(f"missing CTF parameter {f.name}")
            v = torch.as_tensor(merged[f.name], dtype=torch.float64)
            out[f.name] = v.expand(n).clone() if v.ndim == 0 else v.clone()
        return CtfParameters(**out)


def electron_wavelength_a(voltage_kv: Tensor | float) -> Tensor:
    """Relativistic electron wavelength in Angstrom (0.019687 A at 300 kV)."""
    volts = torch.as_tensor(voltage_kv, dtype=torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def evaluate_ctf(ctf: CtfParameters, freq_x_per_a: Tensor, freq_y_per_a: Tensor) -> Tensor:
    """CTF values of every particle at spatial frequencies in 1/Angstrom.

    The frequency tensors have a leading particle axis of size `n` (one frequency set per
    particle, e.g. rotated grids) or 1 (shared), followed by any point axes: `(1, M)`,
    `(n, M)`, `(n, P, M)`. Returns `(n, *points)` in the dtype of the frequencies; the
    arithmetic is done in float64 because defocus * s^2 is a large phase.
    """
    n = len(ctf)
    if freq_x_per_a.shape[0] not in (1, n) or freq_y_per_a.shape[0] not in (1, n):
        raise ValueError("frequency tensors need a leading axis of size 1 or n_particles")
    fx = freq_x_per_a.to(torch.float64)
    fy = freq_y_per_a.to(torch.float64)
    extra = max(fx.ndim, fy.ndim) - 1

    def per_particle(v: Tensor) -> Tensor:
        return v.to(device=fx.device, dtype=torch.float64).reshape(n, *([1] * extra))

    wavelength = per_particle(electron_wavelength_a(ctf.voltage_kv))
    cs_a = per_particle(ctf.spherical_aberration_mm) * 1e7
    q0 = per_particle(ctf.amplitude_contrast)
    s2 = fx * fx + fy * fy
    azimuth = torch.atan2(fy, fx) - torch.deg2rad(per_particle(ctf.defocus_angle_deg))
    du, dv = per_particle(ctf.defocus_u_a), per_particle(ctf.defocus_v_a)
    defocus = -(du + dv) / 2 - (du - dv) / 2 * torch.cos(2 * azimuth)
    amplitude_phase = torch.atan(q0 / torch.sqrt(1 - q0 * q0))
    gamma = (
        math.pi * wavelength * defocus * s2
        + (math.pi / 2) * cs_a * wavelength**3 * s2 * s2
        - torch.deg2rad(per_particle(ctf.phase_shift_deg))
        - amplitude_phase
    )
    envelope = torch.exp(-per_particle(ctf.bfactor_a2) * s2 / 4)
    return (-torch.sin(gamma) * envelope * per_particle(ctf.scale)).to(freq_x_per_a.dtype)


def ctf_delocalisation_a(ctf: CtfParameters, freq_per_a: Tensor) -> Tensor:
    """(n, F): how far, in A, each particle's CTF moves the signal of spatial frequency
    `freq_per_a` ((F,), 1/A) in the image, the gradient of the CTF's phase over 2 pi,
    |lambda dz k - Cs lambda^3 k^3|, along its larger defocus dz (an astigmatic CTF's worse
    axis). Signal moved past the box's edge is lost to the particle's image; moved farther
    than half the box, the CTF turns by more than pi per Fourier pixel and aliases."""
    c = ctf.to(dtype=torch.float64)
    k = freq_per_a.to(device=c.defocus_u_a.device, dtype=torch.float64)[None, :]
    wavelength = electron_wavelength_a(c.voltage_kv).to(k.device)[:, None]
    defocus = torch.maximum(c.defocus_u_a.abs(), c.defocus_v_a.abs())[:, None]
    cs_a = c.spherical_aberration_mm[:, None] * 1e7
    return (wavelength * defocus * k - cs_a * wavelength**3 * k**3).abs()


@dataclass(frozen=True)
class BoxLimits:
    """What a box of particle images can hold, for the particle of median defocus: the finest
    resolution (A) at which the CTF keeps the signal of the whole particle inside the box
    (`particle_inside_a`; coarser detail of its rim is already partly outside beyond it), and
    at which it keeps any signal of the particle's centre (`aliasing_a`). Each is Nyquist's
    2 px when nothing is lost up to it, and infinite when the particle fills the box."""

    particle_inside_a: float
    aliasing_a: float
    defocus_a: float  # the median particle's larger defocus


def box_limits(ctf: CtfParameters, box_size: int, pixel_size_a: float,
               particle_diameter_a: float, samples: int = 4096) -> BoxLimits:
    """The `BoxLimits` of `box_size`-pixel images with this CTF (cryoSPARC and RELION advise
    a box of the particle's diameter plus twice the delocalisation at the target resolution:
    the same criterion, turned round)."""
    box_a = box_size * pixel_size_a
    nyquist_a = 2 * pixel_size_a
    k = torch.linspace(0.0, 1.0 / nyquist_a, samples, dtype=torch.float64)
    defocus = torch.maximum(ctf.defocus_u_a.abs(), ctf.defocus_v_a.abs())
    median = defocus.median(dim=0).indices.reshape(1)  # (a particle of each: memory)
    spread = ctf_delocalisation_a(ctf.index(median), k)[0]  # (F,)

    def finest_a(limit_a: float) -> float:
        outside = torch.nonzero(spread > limit_a).flatten()
        if len(outside) == 0:
            return nyquist_a
        last_inside = int(outside[0]) - 1
        return math.inf if last_inside <= 0 else 1.0 / float(k[last_inside])

    return BoxLimits(finest_a((box_a - particle_diameter_a) / 2), finest_a(box_a / 2),
                     float(defocus[median]))


def at_nyquist(resolution_a: float, pixel_size_a: float) -> bool:
    """Whether a `BoxLimits` resolution is Nyquist's (nothing lost up to it)."""
    return resolution_a <= 2 * pixel_size_a * (1 + 1e-9)


class CtfGrid:
    """The CTF of many particles on one fixed set of frequencies, evaluated fast.

    With s^2, s^4 and the azimuth theta fixed, RELION's phase is linear in five per-particle
    coefficients: gamma = a s^2 + b s^2 cos(2 theta) + c s^2 sin(2 theta) + d s^4 + e, using
    cos(2 (theta - angle)) = cos 2theta cos 2angle + sin 2theta sin 2angle. So a batch costs one
    (n x 5) x (5 x points) product and one sine instead of trigonometry per point. Matches
    `evaluate_ctf` to float64 rounding.
    """

    def __init__(self, freq_x_per_a: Tensor, freq_y_per_a: Tensor) -> None:
        fx = freq_x_per_a.to(torch.float64)
        fy = freq_y_per_a.to(torch.float64)
        self.shape = tuple(fx.shape)
        s2 = (fx * fx + fy * fy).reshape(-1)
        theta = torch.atan2(fy, fx).reshape(-1)
        ones = torch.ones_like(s2)
        self.basis = torch.stack(
            [s2, s2 * torch.cos(2 * theta), s2 * torch.sin(2 * theta), s2 * s2, ones]
        )  # (5, points)
        self.s2 = s2

    def __call__(self, ctf: CtfParameters, dtype: torch.dtype | None = None) -> Tensor:
        """(n, *shape) CTF values, in `dtype` (default float64)."""
        device = self.basis.device
        c = ctf.to(device=device, dtype=torch.float64)
        wavelength = electron_wavelength_a(c.voltage_kv)
        cs_a = c.spherical_aberration_mm * 1e7
        mean_defocus = -(c.defocus_u_a + c.defocus_v_a) / 2
        half_difference = -(c.defocus_u_a - c.defocus_v_a) / 2
        angle = torch.deg2rad(c.defocus_angle_deg)
        q0 = c.amplitude_contrast
        coefficients = torch.stack(
            [
                math.pi * wavelength * mean_defocus,
                math.pi * wavelength * half_difference * torch.cos(2 * angle),
                math.pi * wavelength * half_difference * torch.sin(2 * angle),
                (math.pi / 2) * cs_a * wavelength**3,
                -torch.deg2rad(c.phase_shift_deg) - torch.atan(q0 / torch.sqrt(1 - q0 * q0)),
            ],
            dim=1,
        )  # (n, 5)
        values = -torch.sin(coefficients @ self.basis) * c.scale[:, None]
        if bool((c.bfactor_a2 != 0).any()):
            values = values * torch.exp(-c.bfactor_a2[:, None] * self.s2[None, :] / 4)
        values = values.reshape(len(ctf), *self.shape)
        return values if dtype is None else values.to(dtype)
