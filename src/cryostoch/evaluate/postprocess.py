"""Post-processing of two half maps, as RELION's `relion_postprocess` and cryoSPARC do.

From two independently refined half maps `(N, N, N)` with pixel size `p` A:

1. the unmasked FSC (`fourier_shell_correlation`, shells `k = 0 .. N // 2` of rounded radius,
   shell `k` at frequency `k / (N p)` 1/A);
2. a soft solvent mask, given or automatic (`auto_mask`);
3. the masked FSC, corrected for the mask's own correlation by phase randomisation (Chen et al.
   2013, Ultramicroscopy 135:24): the phases of both halves are replaced by independent random
   phases beyond the shell where the unmasked FSC first falls below 0.8, the randomised halves
   are masked, their FSC is FSC_rand, and FSC_true = (FSC_masked - FSC_rand) / (1 - FSC_rand)
   from the second randomised shell on (FSC_masked before it). As in RELION, the first
   randomised shell keeps FSC_masked: the mask's spectrum carries the unrandomised neighbour's
   correlation into it, and there the formula is biased low (0.65 instead of 0.83 on the
   simulated halves of tests/test_postprocess.py);
4. the resolution where FSC_true first falls below 0.143 (and 0.5), as `FscResult` finds it;
   as RELION does, when the unmasked FSC stays above 0.143 to a finer shell than FSC_true the
   mask is taken to cut into the particle and the unmasked FSC is used instead
   (`mask_skipped`, with a warning; `force_mask` keeps FSC_true), and `warnings` says so when
   the phase-randomised FSC exceeds 0.1 at the resolution (the mask is too sharp);
5. the final map: the average of the halves weighted per shell by Rosenthal & Henderson's
   `sqrt(2 FSC / (1 + FSC))` (FSC_true clipped to [0, 1]), multiplied by `exp(-B s^2 / 4)` and
   low-passed with a raised-cosine edge two shells wide centred on the resolution. B follows
   RELION's sign: the straight line through the Guinier plot (ln of the mean |F| per shell of the
   weighted map against s^2 = 1/d^2) from 10 A to the resolution has slope B / 4, so a map
   that decays with frequency gets a negative B and `exp(-B s^2 / 4)` sharpens it. An explicit
   B (`bfactor`) overrides the fit; negative values sharpen, positive ones blur.

Like RELION's `postprocess.mrc`, the maps are not multiplied by the mask (`result.mask` is
there to do so). Everything here takes and returns tensors; `postprocess_output` writes files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.evaluate.fsc import FscResult, fourier_shell_correlation, half_space_weights
from cryostoch.fourier import irfft3c, radial_index, rfft3_grid, rfft3c, soft_low_pass
from cryostoch.model.solvent import dynamic_mask

__all__ = [
    "AUTO_MASK_DILATE_PX",
    "AUTO_MASK_EDGE_PX",
    "AUTO_MASK_LOWPASS_A",
    "AUTO_MASK_THRESHOLD",
    "CORRECTION_OFFSET",
    "GUINIER_LOW_A",
    "RANDOMIZED_WARN_FSC",
    "RANDOMIZE_FSC",
    "GuinierFit",
    "PostprocessResult",
    "auto_mask",
    "corrected_fsc",
    "fsc_weights",
    "guinier_curve",
    "guinier_fit",
    "last_shell_above",
    "postprocess_halves",
    "randomization_shell",
    "randomize_phases_beyond",
]

RANDOMIZE_FSC = 0.8  # phases are randomised beyond the shell where the unmasked FSC falls below
CORRECTION_OFFSET = 2  # FSC_true is corrected from this many shells beyond that one (RELION)
RANDOMIZED_WARN_FSC = 0.1  # above this at the resolution the mask's own correlation dominates
GUINIER_LOW_A = 10.0  # the Guinier fit starts at this resolution (RELION's default)
AUTO_MASK_LOWPASS_A = 15.0  # the automatic mask follows the average low-passed to this or coarser
# Threshold of the automatic mask, as a fraction of the low-passed average's maximum: the rule
# of the engine's dynamic mask (model.solvent), so that refinement and post-processing agree.
# At 15 A the molecule is a smooth envelope whose density is a sizeable fraction of the peak
# everywhere, while the solvent noise averages out; 0.15 keeps the envelope without speckle.
AUTO_MASK_THRESHOLD = 0.15
AUTO_MASK_DILATE_PX = 3.0
AUTO_MASK_EDGE_PX = 4.0


def _check_volume(volume: Tensor, name: str) -> int:
    if volume.dim() != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"{name} must be cubic (N, N, N), got {tuple(volume.shape)}")
    if not bool(torch.isfinite(volume).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return int(volume.shape[0])


def _shell_frequencies(n: int, pixel_size_a: float) -> Tensor:
    """(N//2 + 1,) frequency of each shell in 1/A, float64 on the CPU."""
    return torch.arange(n // 2 + 1, dtype=torch.float64) / (n * pixel_size_a)


def randomization_shell(fsc_unmasked: Tensor, box_size: int, pixel_size_a: float,
                        randomize_at_a: float | None = None) -> int:
    """The last shell whose phases are kept; shells beyond it are randomised.

    With `randomize_at_a`: `floor(N p / randomize_at_a)`, so that every randomised shell is
    finer than `randomize_at_a` A. Otherwise the first shell `k >= 1` where the unmasked FSC
    `(N//2 + 1,)` falls below `RANDOMIZE_FSC` (RELION's rule), or `N // 2` (nothing randomised)
    if it never does.
    """
    if randomize_at_a is not None:
        if not (math.isfinite(randomize_at_a) and randomize_at_a > 2 * pixel_size_a):
            raise ValueError(f"randomisation resolution {randomize_at_a} A must be coarser than "
                             f"Nyquist ({2 * pixel_size_a:g} A)")
        shell = math.floor(box_size * pixel_size_a / randomize_at_a + 1e-9)
        if shell < 1:
            raise ValueError(f"randomisation resolution {randomize_at_a} A is coarser than the "
                             f"box ({box_size * pixel_size_a:g} A)")
        return min(shell, box_size // 2)
    return min(last_shell_above(fsc_unmasked, RANDOMIZE_FSC) + 1, box_size // 2)


def randomize_phases_beyond(volume: Tensor, shell: int,
                            generator: torch.Generator | None = None) -> Tensor:
    """`volume` `(N, N, N)` with the phase of every Fourier coefficient of rounded radius
    `> shell` replaced by a uniform random phase, amplitudes kept.

    The random phases are those of the rfft of real white noise drawn from `generator`, so they
    obey the same Hermitian symmetry as the map's spectrum and the result is real (and each
    coefficient keeps its amplitude exactly). Same dtype and device as `volume`.
    """
    n = _check_volume(volume, "volume")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    noise = torch.randn(volume.shape, generator=generator, dtype=torch.float64,
                        device=generator.device).to(volume.device)
    spectrum = rfft3c(volume.to(torch.float64))
    phases = rfft3c(noise)
    size = phases.abs()
    unit = torch.where(size > 0, phases / torch.where(size > 0, size, 1.0), 1.0)
    beyond = radial_index(n, half=True, ndim=3, device=volume.device) > shell
    spectrum = torch.where(beyond, spectrum.abs() * unit, spectrum)
    return irfft3c(spectrum, n).to(volume.dtype)


def corrected_fsc(fsc_masked: Tensor, fsc_randomized: Tensor, shell: int) -> Tensor:
    """Chen et al.'s FSC_true `(S,)` for phases randomised beyond `shell`: FSC_masked up to
    `shell + CORRECTION_OFFSET - 1`, from there `(FSC_masked - FSC_rand) / (1 - FSC_rand)`
    (FSC_masked where FSC_rand is 1)."""
    masked = fsc_masked.to(torch.float64)
    rand = fsc_randomized.to(masked)
    beyond = torch.arange(masked.shape[0], device=masked.device) >= shell + CORRECTION_OFFSET
    denom = 1.0 - rand
    ok = beyond & (denom.abs() > 1e-9)
    true = (masked - rand) / torch.where(ok, denom, 1.0)
    return torch.where(ok, true, masked)


def last_shell_above(fsc: Tensor, threshold: float = 0.143) -> int:
    """The last shell `k` of `fsc` `(S,)` before it first falls below `threshold` (0 if shell 1
    already does): RELION's shell count of a resolution, used to compare two curves."""
    below = (fsc[1:] < threshold).nonzero()
    return int(below[0]) if len(below) else int(fsc.shape[0]) - 1


def fsc_weights(fsc: Tensor) -> Tensor:
    """Rosenthal & Henderson's C_ref = sqrt(2 FSC / (1 + FSC)) per shell, FSC clipped to
    [0, 1] (a shell without correlation gets weight 0, a perfect one weight 1)."""
    f = fsc.to(torch.float64).clamp(0.0, 1.0)
    return torch.sqrt(2.0 * f / (1.0 + f))


def auto_mask(half1: Tensor, half2: Tensor, pixel_size_a: float, *,
              resolution_a: float | None = None) -> Tensor:
    """A soft solvent mask `(N, N, N)` in [0, 1] from the average of the halves `(N, N, N)`.

    The average is low-passed (raised-cosine edge two shells wide) to `AUTO_MASK_LOWPASS_A` or
    twice `resolution_a` (the unmasked FSC 0.143 resolution), whichever is coarser. Voxels above
    `AUTO_MASK_THRESHOLD` of its maximum are kept, only the connected region that holds the
    maximum (at this resolution the molecule; solvent specks are dropped), grown by
    `AUTO_MASK_DILATE_PX` pixels and given a raised-cosine edge `AUTO_MASK_EDGE_PX` pixels wide
    (`model.solvent.dynamic_mask`, the engine's rule). Same dtype and device as `half1`.
    """
    n = _check_volume(half1, "half1")
    lowpass_a = max(AUTO_MASK_LOWPASS_A, 2.0 * resolution_a if resolution_a else 0.0)
    radius = n * pixel_size_a / lowpass_a  # cycles per box
    average = 0.5 * (half1.to(torch.float64) + half2.to(torch.float64))
    smooth = soft_low_pass(average, max(radius - 1.0, 0.0), 2.0, ndim=3)
    mask = dynamic_mask(smooth, torch.ones_like(smooth), threshold_fraction=AUTO_MASK_THRESHOLD,
                        dilate_px=AUTO_MASK_DILATE_PX, edge_px=AUTO_MASK_EDGE_PX)
    return mask.clamp(0.0, 1.0).to(half1.dtype)


def _shell_mean_amplitude(spectrum: Tensor, n: int) -> Tensor:
    """(N//2 + 1,) mean |F| per shell of an `rfft3c` spectrum, over the full transform."""
    shells = radial_index(n, half=True, ndim=3, device=spectrum.device)
    weights = half_space_weights(n, device=spectrum.device)
    keep = shells <= n // 2
    index, w = shells[keep], weights[keep]
    total = torch.zeros(n // 2 + 1, dtype=torch.float64, device=spectrum.device)
    total.index_add_(0, index, w * spectrum.abs().to(torch.float64)[keep])
    count = torch.zeros_like(total).index_add_(0, index, w)
    return (total / count).cpu()


def guinier_curve(volume: Tensor, pixel_size_a: float) -> tuple[Tensor, Tensor]:
    """The Guinier plot of a map `(N, N, N)`: `(s2, ln_amplitude)`, each `(N//2 + 1,)` float64
    on the CPU: s^2 = (k / (N p))^2 in 1/A^2 and ln of the mean |F| in shell k (-inf where the
    shell holds no power)."""
    n = _check_volume(volume, "volume")
    amplitude = _shell_mean_amplitude(rfft3c(volume.to(torch.float64)), n)
    return _shell_frequencies(n, pixel_size_a).square(), torch.log(amplitude)


@dataclass(frozen=True)
class GuinierFit:
    """A straight line `ln|F| = intercept + slope s^2` through the shells `fit_shells` of a
    Guinier plot; `bfactor = 4 slope` in A^2 (negative for a map that decays with s)."""

    s2: Tensor  # (S,) 1/A^2
    ln_amplitude: Tensor  # (S,)
    fit_shells: Tensor  # (S,) bool
    slope: float  # A^2
    intercept: float
    correlation: float
    low_a: float  # coarsest resolution of the fit range
    high_a: float  # finest

    @property
    def bfactor(self) -> float:
        return 4.0 * self.slope


def _fit_range(box_size: int, pixel_size_a: float, resolution_a: float
               ) -> tuple[int, int, float] | None:
    """(first shell, last shell, coarse limit in A) of the Guinier fit: the shells from
    `GUINIER_LOW_A` to `resolution_a`; None when fewer than three lie there. Below 10 A the
    amplitudes follow the particle's shape, not its B-factor (RELION refuses an automatic B
    there too), and a line through them sharpens a low-resolution map absurdly."""
    extent = box_size * pixel_size_a
    last = min(math.floor(extent / resolution_a + 1e-9), box_size // 2)
    first = max(1, math.ceil(extent / GUINIER_LOW_A - 1e-9))
    if last - first + 1 < 3:
        return None
    return first, last, GUINIER_LOW_A


def guinier_fit(s2: Tensor, ln_amplitude: Tensor, box_size: int, pixel_size_a: float,
                resolution_a: float) -> GuinierFit | None:
    """Least-squares line through the Guinier plot `(S,)`, `(S,)` over RELION's range (10 A to
    `resolution_a`, see `_fit_range`); None when the map does not reach three shells beyond
    10 A, or fewer than two shells there have power."""
    fit_range = _fit_range(box_size, pixel_size_a, resolution_a)
    if fit_range is None:
        return None
    first, last, low_a = fit_range
    k = torch.arange(s2.shape[0])
    use = (k >= first) & (k <= last) & torch.isfinite(ln_amplitude)
    if int(use.sum()) < 2:
        return None
    x, y = s2[use].to(torch.float64), ln_amplitude[use].to(torch.float64)
    xm, ym = x - x.mean(), y - y.mean()
    slope = float((xm * ym).sum() / (xm * xm).sum())
    intercept = float(y.mean()) - slope * float(x.mean())
    denom = float(torch.sqrt((xm * xm).sum() * (ym * ym).sum()))
    correlation = float((xm * ym).sum()) / denom if denom > 0 else 1.0
    high_a = box_size * pixel_size_a / last
    return GuinierFit(s2, ln_amplitude, use, slope, intercept, correlation, low_a, high_a)


@dataclass(frozen=True)
class PostprocessResult:
    """What `postprocess_halves` computed. Curves are `(N//2 + 1,)` float64 on the CPU, shell
    `k` at `k / (N p)` 1/A; maps and mask are `(N, N, N)` in the halves' dtype and device."""

    pixel_size_a: float
    fsc_unmasked: Tensor
    fsc_masked: Tensor
    fsc_randomized: Tensor
    fsc_corrected: Tensor  # FSC_true, the masked gold-standard curve
    mask_skipped: bool  # the unmasked FSC reached a finer shell than FSC_true (RELION's rule)
    randomize_shell: int  # phases randomised in the shells beyond this one
    bfactor: float  # applied, A^2 (negative sharpens)
    bfactor_source: str  # 'guinier' (the fit's), 'given', or 'none' (too few shells to fit: 0)
    guinier: GuinierFit | None  # the fit, on the FSC-weighted map
    ln_amplitude_weighted: Tensor  # Guinier plot of the FSC-weighted average
    ln_amplitude_sharpened: Tensor  # ... and after the B-factor (before the low-pass)
    mask: Tensor
    mask_auto: bool
    map_sharpened: Tensor
    map_unsharpened: Tensor  # FSC-weighted and low-passed, no B-factor

    @property
    def box_size(self) -> int:
        return int(self.mask.shape[-1])

    @property
    def frequency_per_a(self) -> Tensor:
        return _shell_frequencies(self.box_size, self.pixel_size_a)

    def curve(self, name: str) -> FscResult:
        """One of 'unmasked', 'masked', 'randomized', 'corrected', 'final' as an
        `FscResult`."""
        fsc = getattr(self, f"fsc_{name}")
        return FscResult.from_curve(fsc, self.box_size, self.pixel_size_a)

    @property
    def fsc_final(self) -> Tensor:
        """The curve used: FSC_true, or the unmasked FSC when the mask was skipped."""
        return self.fsc_unmasked if self.mask_skipped else self.fsc_corrected

    @property
    def final_curve_name(self) -> str:
        """'unmasked' when the mask was skipped, else 'corrected'."""
        return "unmasked" if self.mask_skipped else "corrected"

    @property
    def resolution_a(self) -> float:
        """Resolution at 0.143 of the curve used, FSC_true or (mask skipped) the unmasked FSC;
        Nyquist if it never falls below."""
        return self.curve("final").resolution_at(0.143)

    @property
    def resolution_05_a(self) -> float:
        return self.curve("final").resolution_at(0.5)

    @property
    def resolution_corrected_a(self) -> float:
        """Resolution at FSC_true = 0.143 whether or not the mask was skipped."""
        return self.curve("corrected").resolution_at(0.143)

    @property
    def warnings(self) -> list[str]:
        """RELION's two warnings about the mask, where they apply."""
        notes = []
        if self.mask_skipped:
            notes.append("the unmasked FSC extends beyond the solvent-corrected FSC: the mask "
                         "was skipped (the resolution and weighting use the unmasked FSC); "
                         "adjust the mask, or force it with --force-mask")
        shell = max(last_shell_above(self.fsc_final), 1)
        if not self.mask_skipped and float(self.fsc_randomized[shell]) > RANDOMIZED_WARN_FSC:
            notes.append(f"the phase-randomised FSC is {float(self.fsc_randomized[shell]):.2f} "
                         f"(> {RANDOMIZED_WARN_FSC:g}) at the estimated resolution: the "
                         "estimate may be wrong; give a softer mask with fewer features")
        return notes

    @property
    def randomize_at_a(self) -> float:
        """Resolution of the last shell whose phases were kept."""
        return self.box_size * self.pixel_size_a / self.randomize_shell

    @property
    def mask_fraction(self) -> float:
        return float(self.mask.double().mean())


def _filters(n: int, pixel_size_a: float, resolution_a: float, device) -> tuple[Tensor, ...]:
    """Per-coefficient `(N, N, N//2+1)` rounded shell, s^2 (1/A^2) and the soft low-pass:
    a raised cosine from 1 at `k_res - 1` to 0 at `k_res + 1`, `k_res = N p / resolution_a`."""
    shells = radial_index(n, half=True, ndim=3, device=device)
    k2 = sum(g * g for g in rfft3_grid(n, device=device))
    s2 = k2 / (n * pixel_size_a) ** 2
    t = ((k2.sqrt() - (n * pixel_size_a / resolution_a - 1.0)) / 2.0).clamp(0.0, 1.0)
    return shells, s2, 0.5 * (1.0 + torch.cos(math.pi * t))


def _final_maps(half1: Tensor, half2: Tensor, pixel_size_a: float, fsc_true: Tensor,
                resolution_a: float, bfactor: float | None) -> dict:
    """FSC weighting, Guinier fit, sharpening and low-pass of the average of the halves."""
    n = half1.shape[-1]
    shells, s2, lowpass = _filters(n, pixel_size_a, resolution_a, half1.device)
    weights = fsc_weights(fsc_true)
    weights[0] = 1.0  # the mean: its FSC is often meaningless (maps of zero mean)
    weights = torch.cat([weights, torch.zeros(1, dtype=torch.float64)])
    weights = weights.to(half1.device)[shells.clamp(max=n // 2 + 1)]  # 0 beyond N//2
    spectrum = rfft3c(0.5 * (half1.to(torch.float64) + half2.to(torch.float64))) * weights
    ln_weighted = torch.log(_shell_mean_amplitude(spectrum, n))
    s2_shell = _shell_frequencies(n, pixel_size_a).square()
    fit = guinier_fit(s2_shell, ln_weighted, n, pixel_size_a, resolution_a)
    if bfactor is not None:
        b, source = float(bfactor), "given"
    else:
        b, source = (fit.bfactor, "guinier") if fit is not None else (0.0, "none")
    sharpen = torch.exp(-b * s2 / 4.0)
    sharpened = spectrum * torch.where(shells <= n // 2, sharpen, 0.0)  # no inf beyond Nyquist
    return {
        "bfactor": b, "bfactor_source": source, "guinier": fit,
        "ln_amplitude_weighted": ln_weighted,
        "ln_amplitude_sharpened": torch.log(_shell_mean_amplitude(sharpened, n)),
        "map_sharpened": irfft3c(sharpened * lowpass, n).to(half1.dtype),
        "map_unsharpened": irfft3c(spectrum * lowpass, n).to(half1.dtype),
    }


def postprocess_halves(half1: Tensor, half2: Tensor, pixel_size_a: float, *,
                       mask: Tensor | None = None, randomize_at_a: float | None = None,
                       bfactor: float | None = None, force_mask: bool = False,
                       generator: torch.Generator | None = None) -> PostprocessResult:
    """Post-process two half maps `(N, N, N)` (see the module docstring).

    `mask`: `(N, N, N)` in [0, 1], None for `auto_mask`. `randomize_at_a`: randomise phases
    beyond this resolution (A) instead of where the unmasked FSC falls below 0.8. `bfactor`:
    apply this B (A^2, negative sharpens) instead of the Guinier fit's. `force_mask`: use FSC_true
    even where the unmasked FSC reaches further (RELION's `--force_mask`). `generator`: the
    random phases (a generator seeded 0 when None). ValueError on inconsistent input.
    """
    n = _check_volume(half1, "half1")
    if _check_volume(half2, "half2") != n or tuple(half2.shape) != tuple(half1.shape):
        raise ValueError(f"half maps differ in shape: {tuple(half1.shape)}, {tuple(half2.shape)}")
    if not (math.isfinite(pixel_size_a) and pixel_size_a > 0):
        raise ValueError(f"pixel size must be positive, got {pixel_size_a!r}")
    if bfactor is not None and not math.isfinite(bfactor):
        raise ValueError(f"B-factor must be finite, got {bfactor!r}")
    half2 = half2.to(half1)
    cpu = {"device": "cpu", "dtype": torch.float64}
    fsc_unmasked = fourier_shell_correlation(half1, half2)[1].to(**cpu)
    mask_auto = mask is None
    if mask is None:
        unmasked_a = FscResult.from_curve(fsc_unmasked, n, pixel_size_a).resolution_at(0.143)
        mask = auto_mask(half1, half2, pixel_size_a, resolution_a=unmasked_a)
    else:
        if _check_volume(mask, "mask") != n:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from the maps' ({n})")
        if float(mask.min()) < -1e-6 or float(mask.max()) > 1 + 1e-6:
            raise ValueError(f"mask values must lie in [0, 1], found {float(mask.min()):g} "
                             f"to {float(mask.max()):g}")
        mask = mask.to(half1).clamp(0.0, 1.0)
    fsc_masked = fourier_shell_correlation(half1, half2, mask=mask)[1].to(**cpu)
    shell = randomization_shell(fsc_unmasked, n, pixel_size_a, randomize_at_a)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    random1 = randomize_phases_beyond(half1, shell, generator)
    random2 = randomize_phases_beyond(half2, shell, generator)
    fsc_random = fourier_shell_correlation(random1, random2, mask=mask)[1].to(**cpu)
    fsc_true = corrected_fsc(fsc_masked, fsc_random, shell)
    # RELION's rule: a mask whose corrected FSC ends short of the unmasked one cuts into the
    # particle (or the halves share signal outside it); the unmasked curve is then the honest one
    skipped = not force_mask and last_shell_above(fsc_unmasked) > last_shell_above(fsc_true)
    fsc_used = fsc_unmasked if skipped else fsc_true
    resolution_a = FscResult.from_curve(fsc_used, n, pixel_size_a).resolution_at(0.143)
    maps = _final_maps(half1, half2, pixel_size_a, fsc_used, resolution_a, bfactor)
    return PostprocessResult(
        pixel_size_a=float(pixel_size_a), fsc_unmasked=fsc_unmasked, fsc_masked=fsc_masked,
        fsc_randomized=fsc_random, fsc_corrected=fsc_true, mask_skipped=skipped,
        randomize_shell=shell, mask=mask, mask_auto=mask_auto, **maps)
