"""End-to-end reconstruction: outputs, exact resume (also after a kill), optimisers, errors."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from conftest import SHARED_DATA
from cryostoch.cli.main import main
from cryostoch.engine.config import OPTIMIZER_NAMES, ReconstructionConfig
from cryostoch.engine.reconstruct import Reconstruction, reconstruct

CTF_TABLE = SHARED_DATA / "ctf" / "empiar10049_ctf.star"


def simulate(out: Path, n: int, box: int, pixel: float, seed: int = 1, snr: float = 0.05):
    args = ["simulate", "--volume", "phantom", "--n-particles", str(n), "--box", str(box),
            "--pixel-size-a", str(pixel), "--snr", str(snr), "--seed", str(seed), "--out", str(out)]
    if CTF_TABLE.exists():
        args += ["--ctf-table", str(CTF_TABLE)]
    assert main(args) == 0
    return out / "particles.star"


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory.mktemp("tiny"), 400, 32, 8.0)


def tiny_config(particles: Path, out: Path, **kw) -> ReconstructionConfig:
    # the simulated particles are centred: no shift search (its default is 8% of the box)
    base = dict(particles=str(particles), out_dir=str(out), max_freq=0.5, test_size=50,
                epochs=1.0, batch_size=50, seed=3, shift_range_a=0.0)
    base.update(kw)
    return ReconstructionConfig(**base)


def interrupt_after_checkpoints(run: Reconstruction, count: int, monkeypatch) -> None:
    """Run until `count` checkpoints are written, then stop as an interrupted process would."""
    original = run._checkpoint
    calls = {"n": 0}

    def checkpoint_then_die():
        original()
        calls["n"] += 1
        if calls["n"] == count:
            raise KeyboardInterrupt

    monkeypatch.setattr(run, "_checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.run()


def test_reconstruct_writes_every_output(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["reconstruct", str(tiny_set), "--out", str(out), "--epochs", "1",
                 "--max-freq", "0.5", "--test-size", "50", "--batch-size", "50",
                 "--snapshots", "100,300", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "map.mrc" in printed
    with mrcfile.open(out / "map.mrc") as m:
        assert m.data.shape == (32, 32, 32)
        assert float(m.voxel_size.x) == pytest.approx(8.0)
        assert np.isfinite(m.data).all()
        spectrum = np.abs(np.fft.fftn(m.data.astype(np.float64))) ** 2
    # band-limited at the cutoff (--max-freq 0.5: 8 Fourier px) with its 2-px edge: beyond
    # that nothing but round-off, inside it the map
    k = np.fft.fftfreq(32) * 32
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    assert spectrum[radius > 10.0].sum() < 1e-10 * spectrum.sum()
    assert spectrum[(radius > 4) & (radius < 7)].sum() > 1e-3 * spectrum.sum()
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [
        "map_000000100.mrc", "map_000000300.mrc"]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert list(rows[0]) == ["iteration", "epoch", "gradient_evaluations", "minibatch_objective",
                             "test_nll", "learning_rate", "seconds", "cutoff_resolution_a"]
    tests = [float(r["test_nll"]) for r in rows if r["test_nll"]]
    assert tests[-1] < tests[0]
    assert int(rows[-1]["gradient_evaluations"]) >= 350
    poses = starfile.read(out / "poses.star", always_dict=True)
    particles = poses["particles"]
    assert len(particles) == 400
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                   "rlnImageName", "rlnDefocusU", "rlnMaxValueProbDistribution"):
        assert column in particles.columns
    info = json.loads((out / "config.json").read_text())
    assert info["particles"]["test"] == 50 and info["versions"]["torch"] == torch.__version__
    assert info["map_low_pass_a"] == pytest.approx(32.0)  # 8 px of a 32-px box at 8 A/px
    assert (out / "report.png").stat().st_size > 10_000
    assert (out / "report.html").stat().st_size > 50_000  # tests/test_html_report.py checks it


def test_resume_continues_exactly(tiny_set, tmp_path, monkeypatch):
    full = reconstruct(tiny_config(tiny_set, tmp_path / "full"), progress=False)

    # interrupt after the third checkpointed iteration, then resume
    config = tiny_config(tiny_set, tmp_path / "cut", checkpoint_interval_s=0.0)
    interrupt_after_checkpoints(Reconstruction(config, progress=False), 3, monkeypatch)
    assert not (tmp_path / "cut" / "map.mrc").exists()  # nothing that looks finished
    resumed = reconstruct(config, resume=True, progress=False)
    assert torch.equal(resumed.volume, full.volume)
    assert [m["test_nll"] for m in resumed.metrics] == [m["test_nll"] for m in full.metrics]


@pytest.mark.slow
def test_resume_after_the_process_was_killed(tiny_set, tmp_path):
    """A run killed with SIGKILL and resumed gives the same map, bit for bit, as a run that was
    never interrupted (all three in fresh processes with the same environment, since GEMM
    reduction order may depend on the thread set-up)."""

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "cryostoch.cli.main", "reconstruct", str(tiny_set),
                "--out", str(out), "--max-freq", "0.5", "--test-size", "50", "--batch-size",
                "50", "--epochs", "4", "--shift-range-a", "0", "--quiet", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    ref = tmp_path / "ref"
    subprocess.run(command(ref), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out, "--checkpoint-interval-s", "0"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # at the first checkpoint: 27 iterations remain
    proc.wait()
    assert (out / "checkpoint.pt").exists()
    assert not (out / "map.mrc").exists()
    subprocess.run(command(out, "--resume"), check=True, env=env, capture_output=True)
    assert np.array_equal(mrcfile.read(out / "map.mrc"), mrcfile.read(ref / "map.mrc"))


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
def test_every_optimizer_lowers_the_held_out_nll(tiny_set, tmp_path, optimizer):
    config = tiny_config(tiny_set, tmp_path / optimizer, optimizer=optimizer, epochs=0.6,
                         batch_size=60 if optimizer == "hf" else 30, write_poses=False)
    result = reconstruct(config, progress=False)
    tests = [m["test_nll"] for m in result.metrics if m["test_nll"] is not None]
    assert np.isfinite(tests).all()
    assert tests[-1] < tests[0] - 1.0, (optimizer, tests)


def test_resume_with_other_settings_is_refused(tiny_set, tmp_path, capsys):
    out = tmp_path / "a"
    args = ["reconstruct", str(tiny_set), "--out", str(out), "--max-freq", "0.5",
            "--test-size", "50", "--epochs", "0.2", "--quiet"]
    assert main(args) == 0
    assert main(args[:-1] + ["--lr", "0.5", "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt" in err[0] and "lr" in err[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "-1"], "epochs"),
        (["--max-freq", "1.5"], "max-freq"),
        (["--resolution-a", "1.0"], "resolution"),
        (["--test-size", "100000"], "leave none for training"),
        (["--box", "64"], "larger than the data"),
        (["--threads", "0"], "threads"),
        (["--preconditioner", "diag"], "preconditioner"),
        (["--start-freq-fraction", "0"], "start-freq-fraction"),
        (["--marching-stages", "0"], "marching-stages"),
        (["--mask-threshold", "1.5"], "mask-threshold"),
    ],
)
def test_bad_options_give_one_line(tiny_set, tmp_path, capsys, extra, message):
    code = main(["reconstruct", str(tiny_set), "--out", str(tmp_path / "x"), "--quiet",
                 "--max-freq", "0.5"] + extra)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_particles_file(tmp_path, capsys):
    assert main(["reconstruct", str(tmp_path / "nope.star"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.star" in err[0]


@pytest.mark.slow
def test_one_epoch_from_a_random_start_recovers_the_phantom(tmp_path):
    """Issue-level check: phantom at box 64, 3,000 particles, real CTFs, SNR 0.05; one epoch of
    the default optimiser from the random start; aligned FSC >= 0.5 up to 80% of the cutoff."""
    from cryostoch.evaluate.fsc import fsc_report
    from cryostoch.io.mrc import read_map

    star = simulate(tmp_path / "data", 3000, 64, 5.0, seed=11)
    max_freq = 0.25
    result = reconstruct(ReconstructionConfig(particles=str(star), out_dir=str(tmp_path / "r"),
                                              max_freq=max_freq, epochs=1.0, seed=5,
                                              shift_range_a=0.0, start_temperature=8.0,
                                              write_poses=False),
                        progress=False)
    truth, pixel = read_map(tmp_path / "data" / "ground_truth.mrc")
    report = fsc_report(truth, result.volume, pixel_size_a=pixel, align=True)
    cutoff_shell = max_freq * 64 / 2
    fsc = report.fsc.fsc
    assert bool((fsc[1 : int(0.8 * cutoff_shell) + 1] > 0.5).all()), fsc[: int(cutoff_shell) + 1]


@pytest.mark.slow
def test_demo_runs_at_reduced_size(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "demo", "--n-particles", "600", "--box", "48",
                 "--pixel-size-a", "6.5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "FSC 0.5 at" in out and "demo/fsc.png" in out
    for name in ("fsc.png", "aligned_map.mrc", "reconstruction/map.mrc", "data/particles.star"):
        assert (tmp_path / "demo" / name).exists()


@pytest.mark.slow
def test_paper_experiment_at_small_scale(tmp_path):
    """Both parts of the study end to end, untuned, with two of the optimisers (every one of
    the seven runs in tests/test_experiment.py, tuned, on the synthetic part)."""
    from cryostoch.engine.experiment import ExperimentConfig, run_experiment

    real = SHARED_DATA / "betagal_empiar10204" / "Extract" / "job009" / "particles.star"
    config = ExperimentConfig(out_dir=str(tmp_path / "exp"), scale=0.008, epochs=1.0,
                              box_size=48, pixel_size_a=2.8 * 128 / 48,
                              real_particles=str(real) if real.exists() else None,
                              real_max_particles=200, baseline_iterations=2, tuning=None,
                              optimizers=("sgd", "olbfgs"),
                              ctf_table=str(CTF_TABLE) if CTF_TABLE.exists() else None)
    report = run_experiment(config, progress=False)
    text = report.read_text()
    for method in ("sgd", "olbfgs", "cryostoch", "projmatch", "em"):
        assert text.count(f"| {method} |") == 2  # the synthetic and the real table
    for fig in ("fig3_test_nll.png", "fig4_maps.png", "fig6_baselines.png"):
        assert (tmp_path / "exp" / "synthetic" / fig).stat().st_size > 5000


def test_classes_write_class_maps_and_resume_exactly(tiny_set, tmp_path, monkeypatch):
    """--classes 2: one map per class, each particle's class in poses.star, class sizes in
    config.json, and an interrupted run (after a stage change re-measured the proportions)
    resumes bit for bit."""
    config = tiny_config(tiny_set, tmp_path / "full", classes=2, max_freq=0.3)
    full = reconstruct(config, progress=False)
    info = json.loads((tmp_path / "full" / "config.json").read_text())
    sizes = {c["class"]: c["particles"] for c in info["classes"]}
    assert set(sizes) == {1, 2} and sum(sizes.values()) == 400
    largest = info["classes"][0]["class"]
    with mrcfile.open(tmp_path / "full" / f"class_{largest:02d}.mrc") as m:
        assert np.array_equal(m.data, full.volume.numpy())
    poses = starfile.read(tmp_path / "full" / "poses.star", always_dict=True)["particles"]
    counts = poses["rlnClassNumber"].value_counts().to_dict()
    assert counts == sizes

    cut = tiny_config(tiny_set, tmp_path / "cut", classes=2, max_freq=0.3,
                      checkpoint_interval_s=0.0)
    # after the stage changes (7 steps of 50; marching in the first 4)
    interrupt_after_checkpoints(Reconstruction(cut, progress=False), 5, monkeypatch)
    resumed = reconstruct(cut, resume=True, progress=False)
    assert torch.equal(resumed.volume, full.volume)


def test_symmetry_restricts_the_search_and_keeps_the_map_symmetric(tiny_set, tmp_path):
    from cryostoch.geometry.symmetry import point_group, symmetrize_volume

    c1 = json.loads((reconstruct(tiny_config(tiny_set, tmp_path / "c1", epochs=0.3),
                                 progress=False).out_dir / "config.json").read_text())
    result = reconstruct(tiny_config(tiny_set, tmp_path / "d2", epochs=0.3, symmetry="D2"),
                         progress=False)
    d2 = json.loads((result.out_dir / "config.json").read_text())
    ratio = c1["quadrature"]["directions"] / d2["quadrature"]["directions"]
    assert 3.0 < ratio < 5.0  # one asymmetric unit of |D2| = 4
    volume = result.volume.double()
    symmetric = symmetrize_volume(volume, point_group("D2"))
    inner = (slice(1, None),) * 3  # the outermost planes have no image inside the box
    assert torch.allclose(symmetric[inner], volume[inner], atol=1e-5 * float(volume.abs().max()))


@pytest.mark.parametrize("option, value, needle", [
    ("--symmetry", "Q7", "symmetry"),
    ("--noise-model", "pink", "noise-model"),
    ("--classes", "0", "classes"),
    ("--start-temperature", "0.5", "start-temperature"),
    ("--mask", "{missing}", "no such mask file"),
    ("--mask", "{flat}", "cubic"),
    ("--mask", "{empty}", "empty"),
    ("--mask", "{nan}", "NaN"),
])
def test_bad_real_data_options_are_one_line(tiny_set, tmp_path, capsys, option, value, needle):
    import mrcfile

    flat, empty = tmp_path / "flat.mrc", tmp_path / "empty.mrc"
    with mrcfile.new(flat) as m:
        m.set_data(np.ones((1, 32, 32), dtype=np.float32))
    with mrcfile.new(empty) as m:
        m.set_data(np.zeros((32, 32, 32), dtype=np.float32))
    nan = tmp_path / "nan.mrc"
    if "{nan}" in value:  # mrcfile warns when it computes the header statistics of NaNs
        with pytest.warns(RuntimeWarning), mrcfile.new(nan) as m:
            m.set_data(np.full((32, 32, 32), np.nan, dtype=np.float32))
    value = value.format(missing=tmp_path / "absent.mrc", flat=flat, empty=empty, nan=nan)
    assert main(["reconstruct", str(tiny_set), "--out", str(tmp_path / "x"), "--max-freq", "0.5",
                 option, value, "--quiet"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cryostoch:")]
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.slow
def test_coloured_noise_and_mask_recover_a_map_that_white_noise_misses(tmp_path):
    """Issue 11's reduced-size check: particles with coloured noise (low frequencies 3.5x
    noisier than high, like the shared beta-galactosidase background), 30% junk (ice, empty
    images, off-centre neighbours) and varying contrast. The paper's model (white noise, no
    mask) ends far from the truth; the defaults (coloured noise measured from the data, a
    solvent mask following the map) reach FSC 0.5 against the truth near the 40 A cutoff, and
    with three classes much of the junk leaves the molecule's class."""
    from cryostoch.evaluate.fsc import fsc_report
    from cryostoch.io.mrc import read_map

    spectrum = tmp_path / "spectrum.csv"
    freqs = np.linspace(0.0, 0.1, 41)
    spectrum.write_text("\n".join(f"{f:.5f},{0.7 + 1.8 * np.exp(-((f / 0.03) ** 2)):.5f}"
                                  for f in freqs))
    args = ["simulate", "--volume", "phantom", "--n-particles", "3000", "--box", "64",
            "--pixel-size-a", "5", "--snr", "0.05", "--seed", "2", "--junk-fraction", "0.3",
            "--contrast-sigma", "0.2", "--noise-spectrum", str(spectrum),
            "--out", str(tmp_path / "sim")]
    if CTF_TABLE.exists():
        args += ["--ctf-table", str(CTF_TABLE)]
    assert main(args) == 0
    star = tmp_path / "sim" / "particles.star"
    truth, pixel = read_map(tmp_path / "sim" / "ground_truth.mrc")
    # reduced size: one epoch at a fixed 40 A cutoff, and no shift search (the particles are
    # centred); the models' defaults (noise, mask, classes) are what is compared. A run of one
    # epoch needs tempering (the default length of 150 steps does not).
    reduced = dict(max_freq=0.25, epochs=1.0, shift_range_a=0.0, start_temperature=8.0)
    resolution = {}
    for name, extra in (("white", dict(noise_model="white", mask="none")), ("defaults", {})):
        result = reconstruct(ReconstructionConfig(particles=str(star), out_dir=str(tmp_path / name),
                                                  **reduced, **extra), progress=False)
        report = fsc_report(truth, result.volume, pixel_size_a=pixel, align=True)
        resolution[name] = report.fsc.resolution_at(0.5)
    cutoff_a = 64 * 5 / (0.25 * 32)
    assert resolution["defaults"] < 1.15 * cutoff_a, resolution
    assert resolution["white"] > 1.4 * resolution["defaults"], resolution
    # with three classes junk goes to classes of its own
    reconstruct(ReconstructionConfig(particles=str(star), out_dir=str(tmp_path / "k3"),
                                     **reduced, classes=3), progress=False)
    info = json.loads((tmp_path / "k3" / "config.json").read_text())
    largest = info["classes"][0]["class"]
    poses = starfile.read(tmp_path / "k3" / "poses.star", always_dict=True)["particles"]
    junk = starfile.read(star, always_dict=True)["particles"]["rlnCryostochJunk"].to_numpy() > 0
    in_largest = poses["rlnClassNumber"].to_numpy() == largest
    # the molecule's class is enriched in good particles (70% overall) and at least half of
    # the junk is elsewhere (measured with the final code: 84.5% and 58%)
    assert (~junk[in_largest]).mean() > 0.8
    assert (~in_largest[junk]).mean() > 0.5


def test_noise_update_reestimates_the_spectrum_and_resumes_exactly(tiny_set, tmp_path,
                                                                   monkeypatch):
    """--noise-update: the spectrum is re-measured from the residuals at stage changes (it
    differs from the background estimate, stays positive and finite, and is checkpointed)."""
    plain = reconstruct(tiny_config(tiny_set, tmp_path / "plain", max_freq=0.3), progress=False)
    config = tiny_config(tiny_set, tmp_path / "upd", max_freq=0.3, noise_update=True)
    updated = reconstruct(config, progress=False)
    before = json.loads((plain.out_dir / "config.json").read_text())["noise_variance_per_shell"]
    after = json.loads((updated.out_dir / "config.json").read_text())["noise_variance_per_shell"]
    before, after = np.array(before), np.array(after)
    assert np.isfinite(after).all() and (after > 0).all()
    assert not np.allclose(before, after)
    cut = tiny_config(tiny_set, tmp_path / "cut", max_freq=0.3, noise_update=True,
                      checkpoint_interval_s=0.0)
    interrupt_after_checkpoints(Reconstruction(cut, progress=False), 5, monkeypatch)
    assert torch.equal(reconstruct(cut, resume=True, progress=False).volume, updated.volume)


def test_a_given_mask_file_confines_the_map(tiny_set, tmp_path):
    """--mask MASK.mrc (any box: resampled): the map is zero wherever the mask is."""
    import mrcfile

    from cryostoch.evaluate.transform import soft_sphere_mask

    mask_path = tmp_path / "mask.mrc"
    with mrcfile.new(mask_path) as m:
        m.set_data(soft_sphere_mask(32, 8.0, edge_px=2.0).numpy())
    result = reconstruct(tiny_config(tiny_set, tmp_path / "r", epochs=0.3, mask=str(mask_path)),
                         progress=False)
    outside = soft_sphere_mask(32, 10.5, edge_px=0.0) == 0
    assert float(result.volume[outside].abs().max()) == 0.0
    assert float(result.volume.abs().max()) > 0


def test_paper_faithful_and_its_switches_reach_the_config():
    from cryostoch.cli.main import build_parser
    from cryostoch.cli.reconstruct import config_from_args

    parser = build_parser()
    plain = config_from_args(parser.parse_args(
        ["reconstruct", "p.star", "--out", "o", "--paper-faithful", "--noise-model", "coloured"]))
    assert (plain.preconditioner, plain.start_freq_fraction, plain.start_temperature,
            plain.noise_model, plain.mask) == ("none", 1.0, 1.0, "white", "none")
    switches = config_from_args(parser.parse_args(
        ["reconstruct", "p.star", "--out", "o", "--preconditioner", "none",
         "--start-freq-fraction", "1", "--marching-stages", "2", "--mask-threshold", "0.3"]))
    assert (switches.preconditioner, switches.start_freq_fraction, switches.marching_stages,
            switches.noise_model, switches.mask_threshold) == ("none", 1.0, 2, "coloured", 0.3)



def test_a_half_set_run_labels_its_particles_for_relion(tiny_set, tmp_path):
    result = reconstruct(tiny_config(tiny_set, tmp_path / "h2", half_set=2, epochs=0.2,
                                     test_size=20), progress=False)
    written = starfile.read(result.out_dir / "poses.star", always_dict=True)["particles"]
    given = starfile.read(tiny_set, always_dict=True)["particles"]
    assert len(written) == len(given[1::2])  # the even particles, 1-based
    assert list(written["rlnImageName"].str.split("@").str[0].astype(int)) == \
        list(given["rlnImageName"][1::2].str.split("@").str[0].astype(int))
    assert set(written["rlnRandomSubset"]) == {2}
