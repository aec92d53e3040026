"""`cryostoch tune-lr`: the grid, its record, the choice, and bad options."""

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from cryostoch.cli.main import main

CTF_TABLE = SHARED_DATA / "ctf" / "empiar10049_ctf.star"


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tune")
    args = ["simulate", "--volume", "phantom", "--n-particles", "300", "--box", "32",
            "--pixel-size-a", "8", "--snr", "0.05", "--seed", "1", "--out", str(out)]
    if CTF_TABLE.exists():
        args += ["--ctf-table", str(CTF_TABLE)]
    assert main(args) == 0
    return out / "particles.star"


def tune(tiny_set: Path, out: Path, *extra: str) -> int:
    return main(["tune-lr", str(tiny_set), "--out", str(out), "--max-freq", "0.4",
                 "--shift-range-a", "0", "--test-size", "50", "--batch-size", "50",
                 "--subset", "150", "--budget", "300", "--paper-faithful", "--quiet", *extra])


def test_tune_lr_records_the_grid_and_chooses_the_lowest_held_out_nll(tiny_set, tmp_path,
                                                                      capsys):
    out = tmp_path / "tune"
    # 1000x the calibrated rate: far past the stable step (2 / the largest curvature), so it
    # diverges or ends far worse; it must never be chosen
    assert tune(tiny_set, out, "--multiples", "0.5,1,1000") == 0
    record = json.loads((out / "tune_lr.json").read_text())
    grid = record["grid"]
    assert [p["lr_multiple"] for p in grid] == [0.5, 1.0, 1000.0]
    for point in grid:
        assert point["lr"] == pytest.approx(point["lr_multiple"] * record["base_lr"])
        # the budget in whole minibatches (a diverged run stops early)
        spent = point["gradient_evaluations"]
        assert spent == 300 if point["test_nll"] is not None else spent <= 300
    nlls = {p["lr_multiple"]: p["test_nll"] for p in grid}
    finite = {m: v for m, v in nlls.items() if v is not None}
    best = min(finite, key=finite.get)
    assert record["chosen"]["lr_multiple"] == best != 1000.0
    assert record["lr"] == pytest.approx(record["chosen"]["lr"])
    assert record["optimizer"] == "sgd" and record["optimizer_options"] == {}
    assert record["subset_images"] == 150 and record["test_images"] == 50
    # the calibrating step (its curvature evaluation and its gradient) and every run
    assert record["gradient_evaluations_total"] == sum(p["gradient_evaluations"]
                                                       for p in grid) + 2 * 50
    printed = capsys.readouterr().out
    assert "<- chosen" in printed and "tune_lr.json" in printed
    # reconstruct takes the chosen rate from the file
    run = tmp_path / "run"
    assert main(["reconstruct", str(tiny_set), "--out", str(run), "--max-freq", "0.4",
                 "--shift-range-a", "0", "--test-size", "50", "--batch-size", "50",
                 "--epochs", "0.5", "--paper-faithful", "--quiet",
                 "--lr-from", str(out / "tune_lr.json")]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["lr"] == pytest.approx(record["lr"])
    # for another optimiser the file is refused
    assert main(["reconstruct", str(tiny_set), "--out", str(tmp_path / "r2"), "--optimizer",
                 "momentum", "--lr-from", str(out / "tune_lr.json")]) == 2


def test_tune_lr_tunes_the_damping_of_tonga(tiny_set, tmp_path):
    out = tmp_path / "tonga"
    assert tune(tiny_set, out, "--optimizer", "tonga", "--multiples", "1",
                "--damping-multiples", "0.5,2", "--budget", "100") == 0
    record = json.loads((out / "tune_lr.json").read_text())
    assert [p["damping_multiple"] for p in record["grid"]] == [0.5, 2.0]
    assert record["optimizer_options"] == {"damping": record["chosen"]["damping"]}
    assert record["base_damping"] == pytest.approx(1.0)  # TONGA's default regulariser


def test_tune_lr_tunes_the_model_trust_lambda_of_online_lbfgs(tiny_set, tmp_path):
    out = tmp_path / "olbfgs"
    assert tune(tiny_set, out, "--optimizer", "olbfgs", "--multiples", "1",
                "--damping-multiples", "0.1,10", "--budget", "100") == 0
    record = json.loads((out / "tune_lr.json").read_text())
    base = record["base_damping"]
    assert base > 0
    assert [p["damping"] for p in record["grid"]] == pytest.approx([0.1 * base, 10 * base])
    assert record["optimizer_options"] == {"damping": record["chosen"]["damping"]}


def test_tune_lr_tunes_the_delta_of_adagrad_in_units_of_the_first_gradient(tiny_set, tmp_path):
    out = tmp_path / "adagrad"
    assert tune(tiny_set, out, "--optimizer", "adagrad", "--multiples", "1",
                "--damping-multiples", "0.5,4", "--budget", "100") == 0
    record = json.loads((out / "tune_lr.json").read_text())
    assert record["base_damping"] == 1.0  # the unit: delta = d x RMS(first gradient)
    assert [p["damping"] for p in record["grid"]] == [0.5, 4.0]
    assert record["optimizer_options"] == {"damping": record["chosen"]["damping"]}


@pytest.mark.parametrize("extra, says", [
    (("--multiples", "1,-2"), "--multiples"),
    (("--multiples", "a,b"), "--multiples"),
    (("--damping-multiples", "1,10"), "--damping-multiples"),  # sgd has no damping
    (("--subset", "10"), "--subset"),
    (("--optimizer", "nope"), "optimizer"),
])
def test_tune_lr_bad_option_is_one_clear_line(tiny_set, tmp_path, capsys, extra, says):
    assert tune(tiny_set, tmp_path / "bad", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cryostoch: error: ") and says in err[0]
    assert not (tmp_path / "bad" / "tune_lr.json").exists()


@pytest.mark.parametrize("content, says", [
    (None, "cannot be read"),
    ('{"lr": 0.1', "is not a tune_lr.json"),
    ('{"optimizer": "sgd", "lr": -1}', "holds no usable learning rate"),
])
def test_a_bad_lr_from_file_is_one_clear_line(tiny_set, tmp_path, capsys, content, says):
    """reconstruct --lr-from with a missing, truncated or impossible tune_lr.json: one line
    naming the file, exit 2, no run folder."""
    record = tmp_path / "tune_lr.json"
    if content is not None:
        record.write_text(content)
    out = tmp_path / "run"
    assert main(["reconstruct", str(tiny_set), "--out", str(out), "--quiet",
                 "--lr-from", str(record)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(record) in err[0] and says in err[0]
    assert not (out / "map.mrc").exists()


@pytest.mark.parametrize("grid, chosen, past", [
    ([0.25, 0.5, 1, 2, 4, 8, 16], 16, 32),  # the study's grid: x 2 past its top
    ([0.25, 0.5, 1, 2, 4, 8, 16], 0.25, 0.125),
    ([0.25, 0.5, 1, 2, 4, 8, 16], 4, None),  # inside: nothing to add
    ([1, 10, 1000], 1000, 100_000),  # the ratio between the two outermost multiples
    ([4, 1, 2], 1, 0.5),  # in any order
    ([3], 3, None),  # one multiple: no edge to go past
])
def test_beyond_edge_continues_the_grid_at_its_own_ratio(grid, chosen, past):
    from cryostoch.engine.tune_lr import beyond_edge

    assert beyond_edge(grid, chosen) == (None if past is None else pytest.approx(past))


@pytest.mark.parametrize("extend, added, chosen, at_edge", [
    ("3", [4.0, 8.0], 4.0, False),  # stops once the choice lies inside
    ("1", [4.0], 4.0, True),  # the limit reached with the choice still at the edge
    ("0", [], 2.0, True),  # the default: the grid as given
])
def test_tune_lr_extends_a_grid_whose_choice_lies_at_its_edge(tiny_set, tmp_path, monkeypatch,
                                                              extend, added, chosen, at_edge):
    """The short runs replaced by a known held-out NLL, (log2 m - log2 5.5)^2, lowest at
    x 5.5: over powers of 2 its best is x 4, which the grid 1, 2 only reaches by extending."""
    import math

    from cryostoch.engine import tune_lr

    def fake_point(base, point, budget, prepared):
        point["test_nll"] = (math.log2(point["lr_multiple"]) - math.log2(5.5)) ** 2
        point["gradient_evaluations"] = budget
        return budget

    monkeypatch.setattr(tune_lr, "_run_point", fake_point)
    out = tmp_path / "tune"
    assert tune(tiny_set, out, "--multiples", "1,2", "--extend-edges", extend) == 0
    record = json.loads((out / "tune_lr.json").read_text())
    assert [p["lr_multiple"] for p in record["grid"]] == [1.0, 2.0] + added
    assert record["extended_multiples"] == added
    assert record["chosen"]["lr_multiple"] == chosen
    assert record["lr"] == pytest.approx(chosen * record["base_lr"])
    assert record["at_grid_edge"] is at_edge
    assert record["gradient_evaluations_total"] == 300 * (2 + len(added)) + 2 * 50
