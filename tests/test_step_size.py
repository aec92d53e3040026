"""The calibrated step across boxes (issue 13): the engine's Gauss-Newton curvature scale
against an independent power iteration on finite differences of the objective's gradient.

The same object (the built-in phantom, in A) in the same 358 A box is sampled at box 32
(11.2 A/px) and 64 (5.6 A/px), with the same cutoff radius (6.4 Fourier pixels: the same
frequencies in 1/A) and SNR per pixel. Physics: a projection sums N voxels, so the curvature
of the data term in voxel units is N times C^2 times the slices' coverage of each frequency,
and the coverage and CTF are the same at the same frequencies; the stable step therefore
scales as 1 / N (2x from box 32 to 64), N * step being the same within the difference in
pose sharpness (the same SNR per pixel is 4x the SNR per coefficient at the finer sampling).
Measured on these sets: N * step 63 (box 32) and 54 (box 64), a ratio of 0.85; asserted
within 1.5x. The old calibration (1 / ||H u|| along the gradient) put N * step 2.4x apart for
the issue's box 64 / 128 pair (README, "Step sizes").
"""

import math

import pytest
import torch

from conftest import SHARED_DATA
from cryostoch.cli.main import main
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.reconstruct import Reconstruction, minibatch_rows
from cryostoch.engine.step_size import gauss_newton_curvature
from cryostoch.optim.calibration import estimate_curvature_scale

CTF_TABLE = SHARED_DATA / "ctf" / "empiar10049_ctf.star"
FIELD_A = 358.4  # box 64 at 5.6 A/px, the field of view
RADIUS_PX = 6.4


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    out = {}
    for box in (32, 64):
        folder = tmp_path_factory.mktemp(f"box{box}")
        args = ["simulate", "--volume", "phantom", "--n-particles", "300", "--box", str(box),
                "--pixel-size-a", str(FIELD_A / box), "--snr", "0.05", "--seed", "2",
                "--out", str(folder)]
        if CTF_TABLE.exists():
            args += ["--ctf-table", str(CTF_TABLE)]
        assert main(args) == 0
        out[box] = folder / "particles.star"
    return out


def run_for(particles, box: int, tmp_path, **kw) -> Reconstruction:
    config = ReconstructionConfig(
        particles=str(particles), out_dir=str(tmp_path / f"run{box}"),
        max_freq=RADIUS_PX / (box / 2), shift_range_a=0.0, test_size=50, epochs=1.0,
        batch_size=100, seed=0, **kw).paper_faithful()
    return Reconstruction(config, overwrite=True, progress=False)


def largest_positive_eigenvalue(run: Reconstruction, iterations: int = 40) -> float:
    """Power iteration on H + s I with H v by finite differences of the minibatch gradient,
    s the magnitude of the most negative eigenvalue (found first): independent of the
    Gauss-Newton code, it sees the whole Hessian, pose covariance included."""
    rows = minibatch_rows(0, run.config.effective_batch_size, run.prepared.n_train,
                          run.config.seed)
    closure = run._closure(rows, run._enter_stage())
    volume = run.volume
    closure()
    g0 = volume.grad.clone()
    dominant = estimate_curvature_scale(closure, [volume], [g0.clone()], fd_rel=1e-3,
                                        power_iterations=iterations)
    shift = max(-dominant.rayleigh, 0.0)
    h = 1e-3 * float(volume.detach().norm())
    x0 = volume.detach().clone()

    def hessian_times(u):
        with torch.no_grad():
            volume.copy_(x0 + h * u)
        closure()
        out = (volume.grad - g0) / h
        with torch.no_grad():
            volume.copy_(x0)
        return out

    u = g0 / g0.norm()
    lam = 0.0
    for _ in range(iterations):
        y = hessian_times(u) + shift * u
        lam = float(y.norm())
        u = y / lam
    return lam - shift


def calibrated_step(run: Reconstruction) -> float:
    """The base rate SGD resolves at its first step (through the engine's calibration)."""
    run.optimise()
    return float(run.optimizer.param_groups[0]["lr"])


def test_calibrated_steps_agree_across_boxes_and_bound_the_curvature(sets, tmp_path):
    steps, positive, scales = {}, {}, {}
    for box, particles in sets.items():
        run = run_for(particles, box, tmp_path, dtype="float64")
        rows = minibatch_rows(0, 100, run.prepared.n_train, 0)
        current = run._enter_stage()
        scales[box] = gauss_newton_curvature(
            run.prepared, current.model, run.volume, rows, run.world, preconditioner=None,
            noise_precision=None, class_log_weights=None, seed=0)
        positive[box] = largest_positive_eigenvalue(run)
        steps[box] = calibrated_step(run_for(particles, box, tmp_path / "b", dtype="float64",
                                               gradient_budget=1))
    for box in sets:
        # SGD's rate is 2 / L (L an upper bound: BOUND_GAIN), the same L as measured here
        assert steps[box] == pytest.approx(2.0 / scales[box], rel=1e-6)
        # L bounds the positive curvature (H = G - Cov <= G), so the step is stable
        # (<= 2 / lambda_max), and not needlessly small (measured L / lambda_max: 1.66, 1.44)
        assert positive[box] <= scales[box] * 1.02
        assert scales[box] <= 2.0 * positive[box]
    ratio = (64 * steps[64]) / (32 * steps[32])
    assert 1 / 1.5 <= ratio <= 1.5, (steps, ratio)


def test_supplied_curvature_costs_no_closure_call():
    from cryostoch.optim.factory import make_optimizer

    x = torch.tensor([1.0, -2.0], requires_grad=True)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        x.grad = 2 * x.detach()  # f = |x|^2: curvature 2
        return (x.detach() ** 2).sum()

    opt = make_optimizer("sgd", [x])
    opt.supply_curvature_scale(4.0)
    opt.step(closure)
    assert calls["n"] == 1 and opt.closure_calls == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(2 / 4.0)  # BOUND_GAIN / L
    assert opt.calibrated_curvature == 4.0
    with pytest.raises(ValueError):
        opt.supply_curvature_scale(-1.0)
    assert math.isfinite(opt.calibrated_curvature)
