"""`cryostoch refine` end to end at a reduced size: the gold-standard loop improves on its
start against the truth, writes every output, resumes exactly and refuses bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch

from bad_input_support import refused
from cryostoch.cli.main import main
from cryostoch.engine import refine as refine_module
from cryostoch.evaluate.fsc import compute_fsc
from cryostoch.fourier.resample import soft_low_pass
from cryostoch.io.mrc import read_map, write_map

BOX, PIXEL_A = 32, 8.0
START_A = 40.0  # the start map's low-pass


@pytest.fixture(scope="module")
def refine_sim(tmp_path_factory) -> Path:
    """600 box-32 particles of the phantom with shifts at a high SNR, and a start map: the
    truth low-passed to 40 A."""
    out = tmp_path_factory.mktemp("refine") / "sim"
    assert main(["simulate", "--volume", "phantom", "--n-particles", "600", "--box", str(BOX),
                 "--pixel-size-a", str(PIXEL_A), "--snr", "1", "--shift-sigma-a", "3",
                 "--out", str(out), "--montage", "0", "--quiet"]) == 0
    truth, _ = read_map(out / "ground_truth.mrc")
    start = soft_low_pass(truth.double(), BOX * PIXEL_A / START_A, 2.0, ndim=3)
    write_map(out / "start.mrc", start, PIXEL_A)
    return out


def refine_argv(sim: Path, out: Path, *extra: str) -> list[str]:
    return ["refine", str(sim / "particles.star"), "--init", str(sim / "start.mrc"),
            "--out", str(out), "--initial-resolution-a", str(START_A), "--iterations", "3",
            "--global-searches", "2", "--quiet", *extra]  # one search after the first: the
    # default's (6) path at a third of its cost


def fsc_05_against_truth(path: Path, sim: Path) -> float:
    volume, _ = read_map(path)
    truth, _ = read_map(sim / "ground_truth.mrc")
    return compute_fsc(volume.double(), truth.double(), pixel_size_a=PIXEL_A).resolution_at(0.5)


@pytest.fixture(scope="module")
def refined(refine_sim, tmp_path_factory) -> Path:
    """One uninterrupted refinement of `refine_sim` with the defaults (shared: its outputs
    are only read). The references' masks it used (the default, auto) are summarised in
    `masks.json` beside it."""
    out = tmp_path_factory.mktemp("refined") / "whole"
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        record_reference_masks(patch, seen)
        assert main(refine_argv(refine_sim, out)) == 0
    summary = [[float(m.min()), float(m.max()), float(m[0, 0, 0])] for m in seen if m is not None]
    (out.parent / "masks.json").write_text(json.dumps(summary))
    return out


def record_reference_masks(patch: pytest.MonkeyPatch, seen: list) -> None:
    """Patch `Refinement.iterate` to append each iteration's reference mask (None: the
    particle's sphere only) to `seen`."""
    real = refine_module.Refinement.iterate

    def recording(self, state, tau2):
        seen.append(state.reference_mask)
        return real(self, state, tau2)

    patch.setattr(refine_module.Refinement, "iterate", recording)


def test_the_default_references_are_solvent_masked(refined):
    """By default (`--reference-mask auto`) the references are masked by a soft solvent
    mask from the second iteration on: within [0, 1], zero in the box corner (solvent)."""
    seen = json.loads((refined.parent / "masks.json").read_text())
    assert seen and all(low >= 0 and high <= 1 for low, high, _ in seen)
    assert all(corner == 0 for _, _, corner in seen)


@pytest.mark.slow
def test_refine_improves_on_its_start_and_writes_every_output(refine_sim, refined):
    out = refined
    for name in ("map.mrc", "map_unsharpened.mrc", "half1.mrc", "half2.mrc", "mask.mrc",
                 "fsc.csv", "fsc.png", "guinier.png", "postprocess.json", "poses.star",
                 "metrics.csv", "refine.json", "open_in_chimerax.cxc"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.pt").exists()
    script = (out / "open_in_chimerax.cxc").read_text()
    assert all(f"open {name}" in script for name in ("map.mrc", "half1.mrc", "half2.mrc"))
    record = json.loads((out / "refine.json").read_text())
    # what the box holds at the median defocus, recorded (operators/ctf.py tests the numbers)
    limits = record["box_limits"]
    assert set(limits) == {"particle_inside_a", "aliasing_a", "defocus_a"}
    assert limits["defocus_a"] > 0 and limits["aliasing_a"] >= 2 * PIXEL_A
    # the gold standard and the truth both say it went well past the start's 40 A
    assert record["resolution_0143_a"] < 0.75 * START_A
    start_05 = fsc_05_against_truth(refine_sim / "start.mrc", refine_sim)
    assert fsc_05_against_truth(out / "map_unsharpened.mrc", refine_sim) < 0.85 * start_05
    poses = starfile.read(out / "poses.star", always_dict=True)["particles"]
    assert len(poses) == 600
    assert set(np.unique(poses["rlnRandomSubset"])) == {1, 2}
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"} <= set(poses)


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_refine_resumes_exactly_after_an_interruption(refine_sim, refined, tmp_path,
                                                      monkeypatch):
    whole = refined
    cut = tmp_path / "cut"
    real_iterate = refine_module.Refinement.iterate
    calls = {"n": 0}

    def interrupted_iterate(self, state, tau2):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupted
        return real_iterate(self, state, tau2)

    monkeypatch.setattr(refine_module.Refinement, "iterate", interrupted_iterate)
    with pytest.raises(Interrupted):
        main(refine_argv(refine_sim, cut))
    assert (cut / "checkpoint.pt").is_file() and not (cut / "map.mrc").exists()
    monkeypatch.setattr(refine_module.Refinement, "iterate", real_iterate)
    assert main(refine_argv(refine_sim, cut, "--resume")) == 0
    for name in ("half1.mrc", "half2.mrc", "map.mrc"):
        a, _ = read_map(whole / name)
        b, _ = read_map(cut / name)
        assert torch.equal(a, b), name


def test_refine_refuses_bad_input_in_one_line(refine_sim, tmp_path, capsys):
    refused(capsys, refine_argv(refine_sim, tmp_path / "a")[:2] + [
        "--init", str(tmp_path / "missing.mrc"), "--out", str(tmp_path / "a")], "missing.mrc")
    assert not (tmp_path / "a").exists()
    refused(capsys, refine_argv(refine_sim, tmp_path / "b", "--iterations", "0"), "--iterations")
    refused(capsys, refine_argv(refine_sim, tmp_path / "m", "--reference-mask", "tight"),
            "--reference-mask")
    refused(capsys, refine_argv(refine_sim, tmp_path / "k", "--global-top-k", "0"),
            "--global-top-k")
    assert not (tmp_path / "k").exists()
    no_poses = tmp_path / "no_poses"
    no_poses.mkdir()
    blocks = starfile.read(refine_sim / "particles.star", always_dict=True)
    blocks["particles"] = blocks["particles"].drop(
        columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    (no_poses / "particles.mrcs").symlink_to(refine_sim / "particles.mrcs")
    starfile.write(blocks, no_poses / "particles.star")
    refused(capsys, ["refine", str(no_poses / "particles.star"), "--init",
                     str(refine_sim / "start.mrc"), "--out", str(tmp_path / "c"),
                     "--poses-from-input", "--quiet"], "poses")
    assert not (tmp_path / "c").exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "checkpoint.pt").write_bytes(b"not a checkpoint")
    refused(capsys, refine_argv(refine_sim, damaged, "--resume"), "checkpoint.pt")
    chain = ["reconstruct", str(refine_sim / "particles.star"), "--out", str(tmp_path / "r"),
             "--quiet"]
    refused(capsys, chain + ["--refine", "--refine-iterations", "0"], "--refine-iterations")
    refused(capsys, chain + ["--refine-iterations", "3"], "--refine")
    assert not (tmp_path / "r").exists()  # refused before the ab initio run


@pytest.mark.slow
def test_reconstruct_then_refine_in_one_command(refine_sim, tmp_path):
    out = tmp_path / "chain"
    assert main(["reconstruct", str(refine_sim / "particles.star"), "--out", str(out),
                 "--epochs", "0.3", "--test-size", "20", "--quiet", "--refine",
                 "--refine-iterations", "1"]) == 0
    assert (out / "map.mrc").is_file() and (out / "poses.star").is_file()
    record = json.loads((out / "refine" / "refine.json").read_text())
    assert record["config"]["init_map"] == str(out / "map.mrc")
    assert record["config"]["max_iterations"] == 1 and record["iterations"] <= 2
    assert (out / "refine" / "map.mrc").is_file() and (out / "refine" / "half2.mrc").is_file()


def test_exhaustive_re_search_finds_the_true_poses(refine_sim):
    """`top_poses` against the true map recovers the simulated poses (read from the STAR
    file, an independent record) within two grid steps for most particles."""
    from cryostoch.engine.prepare import prepare_run
    from cryostoch.engine.refine_data import RefineConfig, affordable_radius, top_poses
    from cryostoch.geometry.rotations import euler_to_matrix

    config = RefineConfig(particles=str(refine_sim / "particles.star"),
                          init_map=str(refine_sim / "start.mrc"), out_dir="unused")
    run = prepare_run(config.search_config(), progress=False)
    radius = affordable_radius(9.0, run)
    assert run.geometry.cutoff_radius_px <= radius <= 9.0
    truth, _ = read_map(refine_sim / "ground_truth.mrc")
    rows = torch.arange(0, 600, 10)
    rotations, shifts, _ = top_poses(run, truth.double(), rows, radius)
    assert rotations.shape == (len(rows), 1, 3, 3) and shifts.shape == (len(rows), 1, 2)
    rotations, shifts = rotations[:, 0], shifts[:, 0]
    poses = run.dataset.poses
    true_rot = euler_to_matrix(poses.euler_deg[rows].double())
    trace = (rotations.transpose(1, 2) @ true_rot).diagonal(dim1=1, dim2=2).sum(-1)
    error_deg = torch.rad2deg(torch.acos(((trace - 1) / 2).clamp(-1, 1)))
    step_deg = math.degrees(math.atan(1 / radius))
    assert float((error_deg < 2 * step_deg).double().mean()) > 0.9
    shift_error = (shifts - poses.shifts_px[rows].double()).norm(dim=1)
    assert float((shift_error < 1.5).double().mean()) > 0.9


def test_pruned_global_search_re_scores_the_coarse_candidates_finer(refine_sim):
    """The coarse-to-fine search (`refine_search.half_search`) against the true map: the
    exhaustive stage's 8 best poses re-scored at twice its cutoff put the particles closer
    to their simulated poses (read from the STAR file) than the exhaustive stage alone."""
    from cryostoch.engine.checks import read_init_map
    from cryostoch.engine.distributed import ONE_PROCESS
    from cryostoch.engine.prepare import prepare_run
    from cryostoch.engine.refine import Refinement
    from cryostoch.engine.refine_data import (
        RefineConfig,
        coarse_steps,
        full_spectra,
        half_sets,
    )
    from cryostoch.engine.refine_search import half_search
    from cryostoch.evaluate.transform import soft_sphere_mask
    from cryostoch.geometry.rotations import euler_to_matrix, geodesic_angle_rad

    config = RefineConfig(particles=str(refine_sim / "particles.star"),
                          init_map=str(refine_sim / "start.mrc"), out_dir="unused",
                          initial_resolution_a=START_A, global_top_k=8)
    run = prepare_run(config.search_config(), progress=False)
    truth = read_init_map(str(refine_sim / "ground_truth.mrc"), BOX, PIXEL_A, BOX, hint="")
    subset = half_sets(run.dataset, 0)
    sphere = soft_sphere_mask(BOX, run.geometry.particle_radius_px, dtype=torch.float64)
    refinement = Refinement(config, full_spectra(run), subset, sphere, run.symmetrize, 1.0,
                            coarse_steps(run))
    rows = torch.nonzero(subset == 1).flatten()[:120]
    coarse = run.geometry.cutoff_radius_px
    ones = torch.ones(len(rows), dtype=torch.float64)
    true_rot = euler_to_matrix(run.dataset.poses.euler_deg[rows].double())
    true_shift = run.dataset.poses.shifts_px[rows].double()
    errors = {}
    for fine in (coarse, 2 * coarse):
        found = half_search(refinement, run, truth.double(), None, rows, ones, coarse, fine,
                            ONE_PROCESS)
        errors[fine] = (torch.rad2deg(geodesic_angle_rad(found.rotations, true_rot)),
                        (found.shifts_px - true_shift).norm(dim=1))
    step_deg = math.degrees(coarse_steps(run)[0])
    exhaustive, pruned = errors[coarse], errors[2 * coarse]
    assert float((exhaustive[0] < 2 * step_deg).double().mean()) > 0.8
    assert float((pruned[0] < step_deg).double().mean()) > 0.9
    assert float(pruned[0].median()) < 0.8 * float(exhaustive[0].median())
    assert float(pruned[1].median()) < float(exhaustive[1].median())


@pytest.mark.slow
def test_refine_with_the_spherical_reference_mask(refine_sim, tmp_path, monkeypatch):
    """`--reference-mask sphere`: the references keep only the particle's sphere (no solvent
    mask is ever set) and the run still improves on its start."""
    from cryostoch.engine import refine_run

    out = tmp_path / "sphere"
    seen = []
    record_reference_masks(monkeypatch, seen)
    assert main(refine_argv(refine_sim, out, "--reference-mask", "sphere",
                            "--global-searches", "1")) == 0
    assert seen and all(m is None for m in seen)
    record = json.loads((out / "refine.json").read_text())
    assert record["resolution_0143_a"] < 0.75 * START_A
    assert refine_run.CHECKPOINT_NAME not in [p.name for p in out.iterdir()]


def test_normalised_scales_hold_the_mean_at_one_and_bound_junk():
    """The map and the scales trade off, so their mean is held at 1; a junk particle's
    negative or huge least-squares scale is bounded to [0.1, 10] times the mean."""
    raw = torch.tensor([1.0, 2.0, 3.0, -1.0, 100.0], dtype=torch.float64)
    scales = refine_module.normalised_scales(raw)
    assert float(scales.mean()) == pytest.approx(1.0)
    assert float(scales.max() / scales.min()) == pytest.approx(100.0)
    assert torch.equal(scales[:3].argsort(), torch.arange(3))
    # already normalised and inside the bounds: unchanged
    assert torch.allclose(refine_module.normalised_scales(scales[:3] / scales[:3].mean()),
                          scales[:3] / scales[:3].mean())


def test_cpu_chunks_keep_the_candidate_slices_within_the_budget():
    """On the CPU a chunk's (b, J, M) complex slices stay within CPU_CHUNK_BYTES (8 MiB):
    125 rotations x 781 points x 8 bytes (complex64) is 781,000 bytes an image, so 10 images;
    never fewer than one, never more than the configured chunk; other devices keep theirs."""
    from types import SimpleNamespace

    def rows(device: str, dtype: torch.dtype, j: int, m: int) -> int:
        owner = SimpleNamespace(device=torch.device(device), dtype=dtype,
                                config=SimpleNamespace(chunk_size=128))
        return refine_module.Refinement.rows_per_chunk(owner, j, m)

    assert rows("cpu", torch.float32, 125, 781) == 10
    assert rows("cpu", torch.float64, 125, 781) == 5
    assert rows("cpu", torch.float32, 125, 10**6) == 1
    assert rows("cpu", torch.float32, 1, 10) == 128
    assert rows("meta", torch.float32, 125, 781) == 128


@pytest.mark.slow
def test_refine_with_d2_symmetry_improves_on_its_start(tmp_path):
    """A D2-symmetric map (the phantom inside a sphere, averaged over D2), refined with
    --symmetry D2 from its 40 A low-pass: the first search's poses lie in one asymmetric unit,
    the sums are pooled over the group, and the map goes well past its start."""
    from cryostoch.evaluate.transform import soft_sphere_mask
    from cryostoch.geometry.symmetry import point_group, symmetrize_volume, voxel_permutation
    from cryostoch.simulate.phantom import phantom_volume

    group = point_group("D2")
    inside = soft_sphere_mask(BOX, 0.3 * BOX, edge_px=4.0, dtype=torch.float64)
    truth = symmetrize_volume(phantom_volume(BOX, PIXEL_A) * inside, group,
                              permutation=voxel_permutation(group, BOX))
    write_map(tmp_path / "truth.mrc", truth, PIXEL_A)
    sim = tmp_path / "sim"
    assert main(["simulate", "--volume", str(tmp_path / "truth.mrc"), "--n-particles", "400",
                 "--box", str(BOX), "--pixel-size-a", str(PIXEL_A), "--snr", "1",
                 "--shift-sigma-a", "3", "--out", str(sim), "--montage", "0", "--quiet"]) == 0
    write_map(sim / "start.mrc", soft_low_pass(truth, BOX * PIXEL_A / START_A, 2.0, ndim=3),
              PIXEL_A)
    out = tmp_path / "d2"
    assert main(refine_argv(sim, out, "--symmetry", "D2", "--global-searches", "1")) == 0
    record = json.loads((out / "refine.json").read_text())
    assert record["resolution_0143_a"] < 0.75 * START_A
    start_05 = compute_fsc(read_map(sim / "start.mrc")[0].double(), truth,
                           pixel_size_a=PIXEL_A).resolution_at(0.5)
    refined_05 = compute_fsc(read_map(out / "map_unsharpened.mrc")[0].double(), truth,
                             pixel_size_a=PIXEL_A).resolution_at(0.5)
    assert refined_05 < 0.85 * start_05, (refined_05, start_05)


def test_global_searches_follow_each_gain_in_resolution_up_to_their_number(monkeypatch):
    """`_search_again`: a global search before any iteration that follows a gain (stalls 0),
    none before the first local iteration nor past --global-searches or --iterations; after
    a stall only once local searches converged with a cutoff 30% finer than the last one."""
    from types import SimpleNamespace

    from cryostoch.engine import refine_run
    from cryostoch.engine.refine_data import RefineConfig

    config = RefineConfig(particles="p.star", init_map="m.mrc", out_dir="unused",
                          global_rounds=3, max_iterations=8)

    def again(iteration, stalls, searches, converged=False, cutoff=10.0, last=10.0):
        refinement = SimpleNamespace(config=config, converged=lambda state: converged)
        state = SimpleNamespace(iteration=iteration, stalls=stalls, global_searches=searches,
                                global_radius_px=last)
        monkeypatch.setattr(refine_run, "search_radii", lambda *args: (cutoff, cutoff))
        return refine_run._search_again(refinement, None, state)

    assert config.global_rounds == 3 and RefineConfig("p", "m", "o").global_rounds == 6
    assert not again(0, 0, 1)  # the first search has just been made
    assert again(1, 0, 1) and again(4, 0, 2)
    assert not again(4, 0, 3)  # all three made
    assert not again(8, 0, 1)  # no iterations left
    assert not again(3, 1, 1)  # a stall, local searches not converged
    assert not again(3, 2, 1, converged=True, cutoff=12.0)  # converged, cutoff only 20% finer
    assert again(3, 2, 1, converged=True, cutoff=13.5)
