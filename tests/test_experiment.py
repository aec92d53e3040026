"""The paper's study: resuming an interrupted study, its settings check and option errors; the
command-line options that `reconstruct` and `baseline` share (class selection included)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch

from conftest import SHARED_DATA
from cryostoch.cli.main import main
from cryostoch.engine import experiment as experiment_module
from cryostoch.engine import experiment_runs, experiment_tuning
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.experiment import RUN_RECORD, ExperimentConfig, run_experiment
from cryostoch.engine.experiment_tuning import StudyTuning
from cryostoch.engine.prepare import select_particles
from cryostoch.io.mrc import read_map

BETAGAL = SHARED_DATA / "betagal_empiar10204"
BETAGAL_STAR = BETAGAL / "Extract" / "job009" / "particles.star"
CLASS_FILE = BETAGAL / "Class2D" / "job010" / "run_it025_data.star"
CTF_TABLE = SHARED_DATA / "ctf" / "empiar10049_ctf.star"


EXTERNAL = "torch.optim:SGD"  # an optimiser from outside the package, by import path
EXTERNAL_NAME = "torch.optim.SGD"


def tiny_study(out: Path) -> ExperimentConfig:
    """One paper optimiser, one external optimiser, the cryostoch run and both baselines on
    400 images of 48 x 48."""
    return ExperimentConfig(out_dir=str(out), scale=0.008, epochs=0.5, box_size=48,
                            pixel_size_a=2.8 * 128 / 48, optimizers=("sgd", EXTERNAL),
                            real_particles="none", baseline_iterations=1,
                            ctf_table=str(CTF_TABLE) if CTF_TABLE.exists() else "none",
                            tuning=StudyTuning(subset_images=300, budget=200,
                                               multiples=(0.5, 2.0)))


def table_rows(report: Path) -> dict[str, str]:
    rows = {}
    for line in report.read_text().splitlines():
        match = re.match(r"\| ([\w.]+) \| (.*)", line)
        if match and match.group(1) != "method":
            rows[match.group(1)] = match.group(2)
    return rows


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "exp"
    report = run_experiment(tiny_study(out), progress=False)
    return out, report.read_text()


def test_study_writes_records_and_settings(finished_study):
    out, text = finished_study
    for method in ("sgd", EXTERNAL_NAME, "cryostoch", "projmatch", "em"):
        record = json.loads((out / "synthetic" / method / RUN_RECORD).read_text())
        assert record["gradient_evaluations"] > 0 and record["metrics"], method
        assert f"| {method} |" in text
    assert json.loads((out / "experiment.json").read_text())["optimizers"] == ["sgd", EXTERNAL]
    # the particles used, said in the report and on the page
    assert "400 simulated particles (300 training, 100 held out)." in text
    assert "400 simulated particles" in (out / "report.html").read_text()


def test_an_external_optimiser_runs_beside_the_paper_methods(finished_study):
    """--optimizer torch.optim:SGD: its own run (the same budget, SGD's minibatch, the paper's
    plain updates), its row in summary.json and report.md, its curve's run in Fig. 3 and its
    row in Fig. 4 (one more row of panels than the paper methods alone)."""
    out, text = finished_study
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["method"]: row for row in summary["sections"][0]["table"]}
    assert set(rows) == {"sgd", EXTERNAL_NAME, "cryostoch", "projmatch", "em"}
    # the same budget (0.5 epochs of 300 training images), stopped at the first step past it;
    # the wrapper's first step also measures the curvature, so it may take one step more
    budget = 150
    for method in ("sgd", EXTERNAL_NAME):
        assert budget <= rows[method]["gradient_evaluations"] < budget + 2 * 100, method
    assert rows[EXTERNAL_NAME]["final_test_nll"] is not None
    config = json.loads((out / "synthetic" / EXTERNAL_NAME / "config.json").read_text())
    assert config["config"]["optimizer"] == EXTERNAL
    assert config["config"]["preconditioner"] == "none"  # paper-faithful, as the seven
    assert "External optimisers (torch.optim.SGD" in text and "minibatch 100" in text
    # Fig. 4: the truth, sgd, the external method and cryostoch, each one row of panels
    from matplotlib.image import imread

    height_px = imread(out / "synthetic" / "fig4_maps.png").shape[0]
    assert height_px == pytest.approx(90 * (0.45 + 4 * 1.1 + 0.03), abs=3)


def test_snapshot_figure_shows_three_projections_of_every_map_beside_the_truth():
    """Fig. 4's layout: a truth row, then one row per method; per column (snapshot) three
    projections (along z, y, x), each an image; an absent snapshot leaves its panels empty."""
    from cryostoch.evaluate.plots import projection_gallery_figure

    truth = torch.zeros(16, 16, 16)
    truth[4:12, 7:9, 6:10] = 1.0  # elongated along z: a dot seen along z, a bar from the side
    rows = [[truth, None, truth], [truth, truth, truth]]
    fig = projection_gallery_figure(rows, ["a", "b"], ["5 grads", "50 grads", "end"],
                                    reference=truth)
    assert len(fig.axes) == 3 * 3 * 3  # (truth + 2 rows) x 3 columns x 3 projections
    with_image = [len(ax.images) for ax in fig.axes]
    assert with_image == [1] * 9 + [1, 1, 1, 0, 0, 0, 1, 1, 1] + [1] * 9
    assert [ax.get_title() for ax in fig.axes[:3]] == ["along z", "5 grads\nalong y",
                                                       "along x"]
    assert fig.axes[0].get_ylabel() == "truth" and fig.axes[9].get_ylabel() == "a"
    # the projections differ by direction: the bar is 2 voxels wide along y, 8 long along z
    along_z, along_y = (fig.axes[k].images[0].get_array() for k in (0, 1))
    assert (np.asarray(along_z) > 0).sum() == 2 * 4 and (np.asarray(along_y) > 0).sum() == 8 * 4


def test_study_writes_a_self_contained_report_html(finished_study):
    """report.html beside report.md: the three figures embedded as PNG data, one table row
    per method with a link to that run's own report.html, which exists."""
    out, _ = finished_study
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page and "https://" not in page
    for method in ("sgd", "cryostoch", "projmatch", "em"):
        link = f"synthetic/{method}/report.html"
        assert link in page and (out / link).exists(), method


def test_resume_reuses_finished_runs_and_continues_the_rest(finished_study, monkeypatch,
                                                             tmp_path):
    out, text = finished_study
    before_map = read_map(out / "synthetic" / "cryostoch" / "map.mrc")[0]
    before_rows = table_rows(out / "report.md")
    # As if the study was killed after the cryostoch run's last checkpoint but before its
    # record: on resume it continues from the checkpoint; nothing else may run again.
    (out / "synthetic" / "cryostoch" / RUN_RECORD).unlink()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished part of the study ran again")

    monkeypatch.setattr(experiment_module, "simulate_dataset", must_not_run)
    monkeypatch.setattr(experiment_runs.BaselineRun, "run", must_not_run)
    monkeypatch.setattr(experiment_tuning, "tune_learning_rate", must_not_run)
    original_init = experiment_runs.Reconstruction.__init__
    started = []

    def tracked_init(self, config, *, resume=False, overwrite=False, progress=True):
        started.append((Path(config.out_dir).name, resume))
        original_init(self, config, resume=resume, overwrite=overwrite, progress=progress)

    monkeypatch.setattr(experiment_runs.Reconstruction, "__init__", tracked_init)
    report = run_experiment(tiny_study(out), progress=False, resume=True)
    assert started == [("cryostoch", True)]
    after_rows = table_rows(report)
    assert set(after_rows) == set(before_rows)
    for method in ("sgd", "projmatch", "em"):
        assert after_rows[method] == before_rows[method]
    # the resumed run reproduces the final map and test NLL exactly
    assert torch.equal(read_map(out / "synthetic" / "cryostoch" / "map.mrc")[0], before_map)
    nll = lambda row: row.split(" | ")[0]  # noqa: E731
    assert nll(after_rows["cryostoch"]) == nll(before_rows["cryostoch"])
    assert "(resumed)" in report.read_text()


def test_resume_with_other_settings_is_refused(finished_study, capsys):
    out, _ = finished_study
    code = main(["experiment", "paper", "--out", str(out), "--scale", "0.008", "--epochs", "2",
                 "--box", "48", "--optimizers", "sgd", "--real-particles", "none", "--resume",
                 "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "experiment.json" in err[0] and "epochs" in err[0], err


def test_resume_with_an_unreadable_settings_file_gives_one_line(tmp_path, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "experiment.json").write_text("{not json")
    code = main(["experiment", "paper", "--out", str(out), "--real-particles", "none",
                 "--resume", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "experiment.json" in err[0], err


def test_a_failed_run_leaves_no_earlier_report_behind(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "report.md").write_text("an earlier study's report")
    (out / "report.html").write_text("an earlier study's page")

    def fails(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(experiment_module, "simulate_dataset", fails)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_experiment(tiny_study(out), progress=False)
    assert not (out / "report.md").exists()
    assert not (out / "report.html").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--ctf-table", "{missing}"], "absent.star"),
    (["--real-particles", "{missing}"], "absent.star"),
    (["--threads", "0"], "--threads"),
    (["--box", "15"], "box"),
    (["--optimizers", "sgd,rmsprop"], "rmsprop"),
    (["--baseline-iterations", "0"], "baseline-iterations"),
    (["--real-max-particles", "50"], "real-max-particles"),
    (["--optimizer", "no_such_module_xyz:MyOpt"], "no_such_module_xyz:MyOpt"),
    (["--optimizers", "sgd,torch.optim:NoSuchOpt"], "torch.optim:NoSuchOpt"),
    (["--optimizer", "math:pi"], "not a torch.optim.Optimizer subclass"),
    (["--tune-subset", "100"], "tune-subset"),
    (["--tune-budget", "0"], "tune-budget"),
])
def test_experiment_bad_options_give_one_line(tmp_path, capsys, extra, needle):
    extra = [e.format(missing=tmp_path / "absent.star") for e in extra]
    code = main(["experiment", "paper", "--out", str(tmp_path / "exp"), "--quiet", *extra])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "exp" / "report.md").exists()


@pytest.mark.skipif(not CLASS_FILE.exists(), reason="reference data not found")
def test_class_selection_keeps_exactly_the_particles_of_the_chosen_classes():
    from cryostoch.io.dataset import open_particles

    dataset = open_particles(BETAGAL_STAR)
    classes = starfile.read(CLASS_FILE, always_dict=True)["particles"]
    keep = tuple(int(c) for c in classes["rlnClassNumber"].value_counts().index[:3])
    config = ReconstructionConfig(particles=str(BETAGAL_STAR), out_dir="unused",
                                  class_file=str(CLASS_FILE), keep_classes=keep)
    selected = select_particles(config, dataset)
    expected = set(classes.loc[classes["rlnClassNumber"].isin(keep), "rlnImageName"])
    names = list(selected.metadata["rlnImageName"])
    assert len(names) == len(expected) and set(names) == expected
    halves = [select_particles(ReconstructionConfig(
        particles=str(BETAGAL_STAR), out_dir="unused", class_file=str(CLASS_FILE),
        keep_classes=keep, half_set=h), dataset) for h in (1, 2)]
    first, second = (set(h.metadata["rlnImageName"]) for h in halves)
    assert not first & second and first | second == expected
    assert abs(len(first) - len(second)) <= 1


@pytest.mark.parametrize("command", [["reconstruct"], ["baseline", "em"]])
@pytest.mark.parametrize("extra, needle", [
    (["--half-set", "3"], "half-set"),
    (["--dtype", "float16"], "dtype"),
    (["--keep-classes", "1,2"], "class-file"),
    (["--threads", "0"], "--threads"),
])
def test_shared_options_give_the_same_one_line_error(tmp_path, capsys, command, extra, needle):
    star = tmp_path / "particles.star"
    star.write_text("")
    code = main([*command, str(star), "--out", str(tmp_path / "o"), "--quiet", *extra])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o" / "map.mrc").exists()


def test_the_real_study_shrinks_with_the_scale():
    from cryostoch.engine.experiment import ExperimentConfig

    def used(**kw):
        return ExperimentConfig(out_dir="x", real_particles="none", **kw).n_real(2374)

    assert used() == 2374  # the full study uses every particle
    assert used(scale=0.02) == 500  # a quick look: at least 400 train beside 100 held out
    assert used(scale=0.5) == 1187
    assert used(scale=0.02, real_max_particles=300) == 300
    assert used(real_max_particles=5000) == 2374



@pytest.mark.skipif(not BETAGAL_STAR.exists(), reason="reference data not found")
def test_the_real_subset_says_how_many_particles_and_why(tmp_path):
    config = ExperimentConfig(out_dir=str(tmp_path), scale=0.02, real_particles="none")
    path, n_used, _, used = experiment_module._real_subset(config, str(BETAGAL_STAR), tmp_path)
    assert n_used == 500
    assert used.startswith("500 of 2374 particles (--scale 0.02 of them, at least 500;"), used
    assert len(starfile.read(path, always_dict=True)["particles"]) == 500


PAPER_SEVEN = ("sgd", "momentum", "nesterov", "adagrad", "tonga", "olbfgs", "hf")


def small_paper_study(out: Path, tuning: StudyTuning | None) -> ExperimentConfig:
    """The issue's criterion at a CI size: the seven paper methods on 1,000 simulated images
    of 32 x 32 (the paper's 358 A field of view), cutoff 30% of Nyquist (75 A, 4.8 Fourier
    pixels), 5 epochs."""
    return ExperimentConfig(out_dir=str(out), scale=0.02, epochs=5, box_size=32,
                            pixel_size_a=2.8 * 128 / 32, synthetic_max_freq=0.3,
                            optimizers=PAPER_SEVEN, real_particles="none",
                            baseline_iterations=1, tuning=tuning,
                            ctf_table=str(CTF_TABLE) if CTF_TABLE.exists() else "none")


@pytest.mark.slow  # about 90 s here
def test_six_of_the_seven_paper_methods_reach_the_structure_at_a_small_scale(tmp_path):
    """The issue's criterion, at 1/50 scale: at least 6 of the 7 paper methods, each step size
    tuned on a subset as the paper did, reach an aligned FSC of 0.5 against the truth within
    1.3x the cutoff resolution. It can fail: with the calibrated rates untuned (tuning=None)
    the same study reached it with 5 of 7 (AdaGrad at 1.96x, HF at 1.61x); tuned, 6 (HF at
    1.61x), 89 s here."""
    out = tmp_path / "exp"
    run_experiment(small_paper_study(out, StudyTuning(subset_images=500, budget=500,
                                                      multiples=(0.5, 2.0, 8.0))),
                   progress=False)
    section = json.loads((out / "summary.json").read_text())["sections"][0]
    assert section["cutoff_a"] == pytest.approx(2 * 2.8 * 128 / 32 / 0.3)
    assert {row["method"] for row in section["tuning"]} == set(PAPER_SEVEN)
    reached = experiment_module.methods_reaching(section["table"], PAPER_SEVEN)
    ratios = {row["method"]: row["fsc_0.5_over_cutoff"] for row in section["table"]}
    assert len(reached) >= 6, ratios
    assert f"{len(reached)} of 7" in (out / "report.md").read_text()
    early = experiment_module.methods_reaching(section["table"], PAPER_SEVEN,
                                               "one_epoch_fsc_0.5_over_cutoff")
    assert "Within one epoch (the map after as many gradient evaluations as training " \
           f"images, aligned on its own): {len(early)} of 7" in (out / "report.md").read_text()


def test_a_method_reaches_the_structure_within_1_3x_the_cutoff_inclusive():
    table = [{"method": "sgd", "fsc_0.5_over_cutoff": 1.3},
             {"method": "hf", "fsc_0.5_over_cutoff": 1.31},
             {"method": "adam", "fsc_0.5_over_cutoff": 0.9},  # not one of those asked about
             {"method": "tonga"}]  # real data: no FSC against a truth
    assert experiment_module.methods_reaching(table, ("sgd", "hf", "tonga")) == ["sgd"]


def test_tuning_keeps_the_calibrated_rate_when_the_subset_is_smaller_than_a_minibatch(
        tmp_path, monkeypatch):
    """HF's minibatch is 300: with 100 training images it is not tuned (and tune-lr, which
    would refuse the subset, is not called); SGD is; the report says which and why."""
    from cryostoch.engine.experiment_tuning import tuned_plan, tuning_markdown

    calls = []

    def fake_tune(tune, progress):
        calls.append(tune.base.optimizer)
        return {"lr": 0.5, "base_lr": 0.25, "optimizer_options": {},
                "chosen": {"lr_multiple": 2.0}, "at_grid_edge": False,
                "gradient_evaluations_total": 700, "seconds": 1.0}

    monkeypatch.setattr(experiment_tuning, "tune_learning_rate", fake_tune)
    plan = [(name, ReconstructionConfig(particles="p.star", out_dir=str(tmp_path / name),
                                        optimizer=name, test_size=20))
            for name in ("sgd", "hf")]
    tuned, rows = tuned_plan(plan, StudyTuning(subset_images=300), tmp_path, 100,
                             progress=False, resume=False)
    assert calls == ["sgd"]
    assert tuned[0][1].lr == 0.5 and tuned[1][1] == plan[1][1]
    assert "not_tuned" in rows[1] and "300" in rows[1]["not_tuned"]
    text = "\n".join(tuning_markdown(rows, StudyTuning(subset_images=300)))
    assert "| hf | calibrated, not tuned: 100 training images" in text
    assert "700 gradient evaluations" in text


def test_the_tuning_budget_is_a_fixed_share_of_the_method_run():
    """Each grid point gets 4% of its method run's gradient evaluations, at least 2,000 (20
    steps of a minibatch of 100), unless a count is given: at full size (49,900 training
    images, 10 epochs = 499,000) 19,960; at 1/4 scale (12,400 images) 4,960; at 1/10 scale
    (49,000: 4% would be 1,960) and at 1/50 (9,000) the floor of 2,000."""
    tuning = StudyTuning()
    full = ReconstructionConfig(particles="p.star", out_dir="x", epochs=10,
                                gradient_budget=499_000)
    assert tuning.point_budget(full, 49_900) == 19_960
    assert tuning.point_budget(dataclasses.replace(full, gradient_budget=124_000),
                               12_400) == 4960
    run = dataclasses.replace(full, gradient_budget=49_000)
    assert tuning.point_budget(run, 4900) == 2000
    assert tuning.point_budget(dataclasses.replace(run, gradient_budget=9000), 900) == 2000
    # no gradient budget: the run's epochs over its training images (10 x 12,400)
    assert tuning.point_budget(dataclasses.replace(full, gradient_budget=None),
                               12_400) == 4960
    assert StudyTuning(budget=500).point_budget(full, 49_900) == 500
    with pytest.raises(ValueError, match="run fraction"):
        StudyTuning(run_fraction=0)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("halving") / "sim"
    assert main(["simulate", "--volume", "phantom", "--n-particles", "300", "--box", "32",
                 "--pixel-size-a", "8", "--snr", "0.1", "--out", str(out), "--montage", "0",
                 "--quiet"]) == 0
    return out / "particles.star"


def halving_config(star: Path, out: Path, lr: float) -> ReconstructionConfig:
    return ReconstructionConfig(particles=str(star), out_dir=str(out / "sgd"), max_freq=0.3,
                                test_size=50, epochs=0.3, batch_size=50, seed=3,
                                shift_range_a=0.0, optimizer="sgd", lr=lr).paper_faithful()


def test_a_run_that_diverges_is_run_again_at_half_the_step(small_set, tmp_path, monkeypatch,
                                                           caplog):
    """A paper method whose (tuned) step diverges over the whole run is run again from the
    start at half the step, up to three times, and the report's records say how often: here
    the run diverges (patched: a non-finite objective) whenever its lr exceeds 0.3, planned
    at 1.0, so it ends at 0.25 after two halvings; a resumed study continues at that step."""
    from cryostoch.engine.reconstruct import Reconstruction
    from cryostoch.errors import DivergedError

    tried = []
    real_run = Reconstruction.run

    def diverging_above(self):
        tried.append(self.config.lr)
        if self.config.lr > 0.3:
            raise DivergedError(self.config.particles, "the reconstruction diverged (test)")
        return real_run(self)

    monkeypatch.setattr(Reconstruction, "run", diverging_above)
    plan = [("sgd", halving_config(small_set, tmp_path, 1.0))]
    with caplog.at_level("WARNING"):
        (run,) = experiment_runs.run_methods(plan, tmp_path, progress=False, resume=False)
    assert tried == [1.0, 0.5, 0.25]
    assert run.lr_halvings == 2 and torch.isfinite(run.volume).all()
    assert sum("half the step" in r.getMessage() for r in caplog.records) == 2
    record = json.loads((tmp_path / "sgd" / RUN_RECORD).read_text())
    assert record["lr_halvings"] == 2 and record["lr_used"] == 0.25
    assert record["settings"]["lr"] == 1.0  # the plan, which a resumed study matches
    # the finished run is reused on resume, its halvings with it
    tried.clear()
    (again,) = experiment_runs.run_methods(plan, tmp_path, progress=False, resume=True)
    assert tried == [] and again.lr_halvings == 2
    # an interrupted halved run resumes at its halved step
    (tmp_path / "sgd" / RUN_RECORD).unlink()
    experiment_runs.run_methods(plan, tmp_path, progress=False, resume=True)
    assert tried == [0.25]


def test_a_run_that_diverges_at_every_halving_ends_the_study(small_set, tmp_path):
    """A step far too large (lr 1e12, genuinely non-finite) diverges four times: the error
    reaches the user as before, after three halvings."""
    from cryostoch.errors import DivergedError

    plan = [("sgd", halving_config(small_set, tmp_path, 1e12))]
    with pytest.raises(DivergedError, match="diverged"):
        experiment_runs.run_methods(plan, tmp_path, progress=False, resume=False)
    saved = json.loads((tmp_path / "sgd" / experiment_runs.HALVINGS_FILE).read_text())
    assert saved == {"halvings": 3}


def test_the_report_names_the_runs_whose_step_was_halved(tmp_path):
    section = {"name": "synthetic", "particles": "400 simulated particles", "tuning": [],
               "figures": [], "folder": "synthetic", "cutoff_a": 50.0,
               "table": [{"method": "nesterov", "final_test_nll": 1.0},
                         {"method": "sgd", "final_test_nll": 2.0}],
               "lr_halvings": {"nesterov": 1}}
    config = ExperimentConfig(out_dir=str(tmp_path), real_particles="none", tuning=None)
    text = experiment_module._markdown([section], config, 60.0, 60.0, False)
    assert ("run again from the start at a smaller one: nesterov (1/2 of it)." in text)
    del section["lr_halvings"]
    assert "run again from the start" not in experiment_module._markdown(
        [section], config, 60.0, 60.0, False)


def test_resume_starts_again_a_run_stopped_before_its_first_checkpoint(small_set, tmp_path):
    """A method folder with outputs (snapshots) but no checkpoint, as a run left that
    diverged before the study could go on: --resume runs it again rather than refusing."""
    config = dataclasses.replace(halving_config(small_set, tmp_path, 1.0), lr=None)
    snapshots = tmp_path / "sgd" / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / "map_000000050.mrc").write_bytes(b"left from a stopped run")
    (run,) = experiment_runs.run_methods([("sgd", config)], tmp_path, progress=False,
                                         resume=True)
    assert torch.isfinite(run.volume).all() and run.lr_halvings == 0
    assert (tmp_path / "sgd" / RUN_RECORD).exists()


def test_resume_starts_afresh_a_run_whose_planned_settings_changed(small_set, tmp_path,
                                                                   monkeypatch):
    """A method re-tuned between two invocations (another rate): --resume must not continue
    (or refuse) the checkpoint of the old settings, nor apply the old run's halvings; it runs
    the method again from the start with the new plan."""
    from cryostoch.engine.reconstruct import Reconstruction

    old = [("sgd", halving_config(small_set, tmp_path, 0.5))]
    experiment_runs.run_methods(old, tmp_path, progress=False, resume=False)
    (tmp_path / "sgd" / RUN_RECORD).unlink()  # as if stopped after its last checkpoint
    (tmp_path / "sgd" / experiment_runs.HALVINGS_FILE).write_text('{"halvings": 1}')
    seen = []
    real_init = Reconstruction.__init__

    def tracked(self, config, *, resume=False, overwrite=False, progress=True):
        seen.append((config.lr, resume))
        real_init(self, config, resume=resume, overwrite=overwrite, progress=progress)

    monkeypatch.setattr(Reconstruction, "__init__", tracked)
    new = [("sgd", halving_config(small_set, tmp_path, 0.25))]
    (run,) = experiment_runs.run_methods(new, tmp_path, progress=False, resume=True)
    assert seen == [(0.25, False)] and run.lr_halvings == 0
    record = json.loads((tmp_path / "sgd" / RUN_RECORD).read_text())
    assert record["settings"]["lr"] == 0.25 and record["lr_used"] == 0.25
    # and the same plan again resumes (here: reuses) rather than starting over
    seen.clear()
    (tmp_path / "sgd" / RUN_RECORD).unlink()
    experiment_runs.run_methods(new, tmp_path, progress=False, resume=True)
    assert seen == [(0.25, True)]


def test_the_one_epoch_column_aligns_the_snapshot_on_its_own(tmp_path):
    """A one-epoch snapshot that is the truth turned 90 degrees about z (exactly, by
    permuting voxels) scores as the truth itself once aligned on its own, although the final
    map (the truth unturned) needs no rotation; a snapshot of noise misses the criterion;
    the baselines, which take no snapshots, get no column."""
    from cryostoch.engine.experiment_figures import ONE_EPOCH_KEY, fsc_columns
    from cryostoch.io.mrc import write_map
    from cryostoch.simulate.phantom import phantom_volume

    pixel, n_train = 12.0, 40
    truth = phantom_volume(32, pixel, dtype=torch.float32)
    runs = {}
    for name, snapshot in (("sgd", torch.rot90(truth, 1, dims=(1, 2))),
                           ("adagrad", torch.randn(32, 32, 32,
                                                   generator=torch.Generator().manual_seed(0))),
                           ("em", None)):
        folder = tmp_path / name / "snapshots"
        folder.mkdir(parents=True)
        if snapshot is not None:
            write_map(folder / f"map_{n_train:09d}.mrc", snapshot.contiguous(), pixel)
        runs[name] = experiment_runs.MethodRun(name, tmp_path / name, [], truth, 1.0, 0, None)
    cutoff_a = 3 * pixel
    columns = {name: fsc_columns(run, truth, truth, pixel, cutoff_a, n_train)
               for name, run in runs.items()}
    best = columns["sgd"]["fsc_0.5_over_cutoff"]  # the truth against itself
    assert columns["sgd"][ONE_EPOCH_KEY] == pytest.approx(best, abs=0.05)
    assert columns["adagrad"][ONE_EPOCH_KEY] > experiment_module.CRITERION_FACTOR
    assert ONE_EPOCH_KEY not in columns["em"]
    table = [{"method": name, **c} for name, c in columns.items()]
    assert experiment_module.methods_reaching(table, ("sgd", "adagrad"), ONE_EPOCH_KEY) == ["sgd"]
