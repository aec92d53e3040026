"""The baselines' M-step under a point group: the back-projection sums are pooled over the
group before the solve and the CG refinement stays on symmetric maps. Under a group the
quadrature covers one asymmetric unit, so every pose lies in it; noise-free images of a
D2-symmetric truth must then give back the truth, which solving without the group and
averaging the map after does not. C1 is unchanged."""

from __future__ import annotations

import pytest
import torch

from cryostoch.baselines import closed_form_map, em_iteration
from cryostoch.baselines.reconstruct_map import Regulariser
from cryostoch.engine.prepare import Symmetrizer
from cryostoch.evaluate.fsc import fourier_shell_correlation
from cryostoch.evaluate.transform import soft_sphere_mask
from cryostoch.fourier import low_pass
from cryostoch.geometry.quadrature import orientation_quadrature
from cryostoch.geometry.symmetry import point_group, restrict_orientation_quadrature
from cryostoch.model.hard_assignment import hard_statistics
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.simulate.phantom import phantom_volume
from test_baselines import _one_thread, ctf_set, simulate_at_poses  # noqa: F401 (autouse)

F64 = torch.float64
BOX, RADIUS = 24, 8.0


@pytest.fixture(scope="module")
def d2_data():
    """A D2-symmetric truth, a model whose quadrature is D2's asymmetric unit, and 100
    noise-free CTF-modulated images at its quadrature poses (image blocks, CTFs, poses): few
    enough that the slices leave gaps which only the symmetry mates fill."""
    group = point_group("D2")
    full = orientation_quadrature(RADIUS, dtype=F64)
    model = MarginalLikelihood(
        LikelihoodConfig(box_size=BOX, pixel_size_a=6.0, max_radius_px=RADIUS), dtype=F64,
        orientations=restrict_orientation_quadrature(full, group))
    d2 = Symmetrizer("D2", BOX, torch.device("cpu"))
    inside = soft_sphere_mask(BOX, 0.3 * BOX, edge_px=4.0, dtype=F64)
    truth = d2(phantom_volume(BOX, 6.0) * inside)
    count = 100
    pose = torch.randint(0, model.quadrature_size, (count,),
                         generator=torch.Generator().manual_seed(12))
    ctf = ctf_set(count, 13)
    images = simulate_at_poses(model, truth, pose, ctf, noise=0.0, seed=14)
    return model, d2, truth, model.image_blocks(images), ctf, pose


def fsc_vs_truth(volume, truth, last_shell=int(RADIUS)):
    shells = slice(1, last_shell + 1)
    return fourier_shell_correlation(volume.double(), low_pass(truth, RADIUS, 3))[1][shells]


def test_truth_is_d2_symmetric_and_the_poses_lie_in_one_asymmetric_unit(d2_data):
    model, d2, truth, *_ = d2_data
    torch.testing.assert_close(d2(truth), truth, rtol=0, atol=1e-12)
    full = orientation_quadrature(RADIUS, dtype=F64)
    assert model.n_directions < 0.3 * full.directions.shape[0]


@pytest.mark.parametrize("refine_iterations", [0, 10])
def test_pooled_m_step_recovers_the_symmetric_truth(d2_data, refine_iterations):
    """closed_form_map with the group: FSC > 0.9 vs the truth in every shell to the cutoff
    (gridded) or 0.95 (with the CG steps), a D2-symmetric map; solving without the group and
    averaging after (the former baselines) falls clearly short."""
    model, d2, truth, blocks, ctf, pose = d2_data
    num, den = hard_statistics(model, blocks, ctf, pose)
    none = Regulariser("none")
    pooled = closed_form_map(num, den, model, regulariser=none, symmetrize=d2,
                             refine_iterations=refine_iterations)
    averaged = d2(closed_form_map(num, den, model, regulariser=none,
                                  refine_iterations=refine_iterations))
    fsc_pooled, fsc_averaged = fsc_vs_truth(pooled, truth), fsc_vs_truth(averaged, truth)
    assert float(fsc_pooled.min()) > (0.95 if refine_iterations else 0.9), fsc_pooled
    assert float(fsc_averaged.min()) < float(fsc_pooled.min()) - 0.1, (fsc_averaged,
                                                                       fsc_pooled)
    # symmetric (the voxel average leaves out the even box's unpaired outer planes)
    inner = (slice(1, None),) * 3
    torch.testing.assert_close(d2(pooled)[inner], pooled[inner], rtol=0,
                               atol=1e-9 * float(pooled.abs().max()))


def test_em_iteration_with_the_group_beats_averaging_after(d2_data):
    """One batch EM iteration (Wiener prior from the current map) started at the truth: with
    the group, the map stays close to the truth below the cutoff shell (where the Wiener
    filter of 100 images shrinks both); averaged after, it loses signal."""
    model, d2, truth, blocks, ctf, _ = d2_data
    pooled = em_iteration(model, truth, blocks, ctf, symmetrize=d2)
    plain = em_iteration(model, truth, blocks, ctf)
    below = int(RADIUS) - 1
    fsc_pooled = fsc_vs_truth(pooled.volume, truth, below)
    fsc_averaged = fsc_vs_truth(d2(plain.volume), truth, below)
    assert float(fsc_pooled.min()) > 0.95, fsc_pooled
    assert float(fsc_averaged.min()) < float(fsc_pooled.min()) - 0.05, (fsc_averaged,
                                                                        fsc_pooled)
    assert torch.equal(pooled.pose_index, plain.pose_index)  # the same E-step


def test_c1_is_unchanged(d2_data):
    """A C1 symmetriser changes nothing: bit for bit the map without one."""
    model, _, truth, blocks, ctf, _ = d2_data
    c1 = Symmetrizer("C1", BOX, torch.device("cpu"))
    a = em_iteration(model, truth, blocks, ctf, symmetrize=c1)
    b = em_iteration(model, truth, blocks, ctf)
    assert torch.equal(a.volume, b.volume)
    with pytest.raises(ValueError, match="group"):
        closed_form_map(*hard_statistics(model, blocks[:10], ctf.index(slice(0, 10)),
                                         torch.zeros(10, dtype=torch.long)), model,
                        symmetrize=lambda v: v)


@pytest.mark.parametrize("symmetry", ["C1", "D2"])
def test_baseline_run_passes_the_point_group_to_the_m_step(tmp_path, monkeypatch, symmetry):
    """`cryostoch baseline --symmetry D2` hands the run's symmetriser to the step (C1: none),
    whose map is then D2-symmetric before the engine averages it."""
    import cryostoch.engine.baseline as engine
    from cryostoch.engine.baseline import BaselineConfig, BaselineRun
    from cryostoch.engine.config import ReconstructionConfig
    from test_baselines import write_particle_set

    star, _ = write_particle_set(tmp_path, count=120)
    seen, maps = [], []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("symmetrize"))
        result = em_iteration(*args, **kwargs)
        maps.append(result.volume.double())
        return result

    monkeypatch.setattr(engine, "em_iteration", spy)
    recon = ReconstructionConfig(particles=str(star), out_dir=str(tmp_path / "out"),
                                 max_freq=0.2, test_size=20, seed=3, shift_range_a=0.0,
                                 symmetry=symmetry)
    run = BaselineRun(BaselineConfig("em", recon, iterations=1), progress=False)
    run.run()
    if symmetry == "C1":
        assert seen == [None]
        return
    assert seen == [run.prepared.symmetrize]
    inner = (slice(1, None),) * 3
    volume = maps[0]
    torch.testing.assert_close(run.prepared.symmetrize(volume)[inner], volume[inner], rtol=0,
                               atol=1e-5 * float(volume.abs().max()))
