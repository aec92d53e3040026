"""`cryostoch info` on real STAR, .cs and MRC files, and on bad input."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import torch

from cryostoch.cli.main import main
from cryostoch.io import write_map


def info(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_info_betagal_star(capsys, shared_data):
    star = shared_data / "betagal_empiar10204" / "Extract" / "job009" / "particles.star"
    status, out, _ = info(capsys, star)
    assert status == 0
    for needle in [
        "RELION STAR",
        "2,374",
        "64 px",
        "3.54 A",
        "opticsGroup1",
        "200 kV",
        "Cs 1.4 mm",
        "Q0 0.1",
        "Defocus U:",
        "Astigmatism",
        "absent",  # poses
        "10 (all found",
        "Usable:             yes",
        # the defaults reconstruct chooses: 0.8 x 226.6 A / 5 and 8% of 226.6 A
        "cutoff 36.2 A, shifts within 18.1 A",
    ]:
        assert needle in out, needle


def test_info_says_where_the_ctf_aliases_in_the_box(capsys, shared_data):
    """The betagal particles (200 kV, Cs 1.4 mm, ~4 um underfocus, 64 px of 3.54 A): beyond
    the frequency where the CTF moves signal by half the box (lambda dz k - Cs lambda^3 k^3 =
    113 A, solved here with numpy for the median larger defocus), the CTF aliases."""
    import re

    import numpy as np
    import starfile

    star = shared_data / "betagal_empiar10204" / "Extract" / "job009" / "particles.star"
    _, out, _ = info(capsys, star)
    table = starfile.read(star)["particles"]
    larger = np.maximum(table["rlnDefocusU"].abs(), table["rlnDefocusV"].abs()).to_numpy()
    dz = np.sort(larger)[(len(larger) - 1) // 2]  # the lower median, as torch's
    volts = 200e3
    lam = 12.2643247 / np.sqrt(volts * (1 + 0.978466e-6 * volts))
    cs = 1.4e7
    roots = np.roots([-cs * lam**3, 0.0, lam * dz, -64 * 3.54 / 2])
    k = min(r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0)
    found = re.search(r"aliases beyond ([0-9.]+) A at the median defocus \(([0-9]+) A\)", out)
    assert found, out
    assert float(found.group(1)) == pytest.approx(1 / k, abs=0.06)
    assert float(found.group(2)) == pytest.approx(dz, abs=1)


def test_info_reports_the_offsets_of_aligned_particles(capsys, shared_data):
    import starfile

    root = shared_data / "betagal_empiar10204"
    star = root / "Class2D" / "job010" / "run_it025_data.star"
    status, out, _ = info(capsys, star, "--project-root", root)
    assert status == 0
    table = starfile.read(star, always_dict=True)["particles"]
    offsets = np.hypot(table["rlnOriginXAngst"], table["rlnOriginYAngst"])
    assert (f"median {np.median(offsets):.1f} A, 90% within {np.percentile(offsets, 90):.1f} A"
            in out), out


def test_info_cs_metadata_only(capsys, shared_data):
    path = shared_data / "formats" / "cryosparc_P12_J24_001_particles.cs"
    raw = np.load(path)
    status, out, err = info(capsys, path)
    assert status == 2  # described, but the stacks it names are not there
    assert err.count("\n") == 1 and str(path) in err and "image stack" in err
    assert "cryoSPARC" in out and "2,019" in out and "180 px" in out and "2.95 A" in out
    assert "present" in out  # poses
    assert "missing" in out and "Usable:             no" in out
    lo, hi = raw["ctf/df1_A"].min(), raw["ctf/df1_A"].max()
    assert f"{lo:.0f} .. {hi:.0f} A" in out


def test_info_mixed_optics(capsys, shared_data):
    status, out, err = info(capsys, shared_data / "formats" / "relion31.6opticsgroups.star")
    assert status == 2 and "139 missing" in err  # its stacks are not in the reference data
    assert "Optics groups:      6" in out and "1.24 A, 1.25 A" in out
    assert "different pixel sizes" in out


def test_info_mrc_stack(capsys, shared_data):
    path = shared_data / "formats" / "sample.mrcs"
    status, out, _ = info(capsys, path)
    assert status == 0
    assert "MRC image stack" in out and "17 of 200 x 200 px" in out and "float32" in out
    assert "not set" in out  # voxel size 0 in this header
    with mrcfile.open(path) as mrc:
        data = mrc.data.astype(np.float64)
    assert f"{data.mean():.6g} / {data.std():.6g}" in out
    assert f"{data.min():.6g} / {data.max():.6g}" in out


def test_info_map(capsys, tmp_path):
    path = tmp_path / "vol.mrc"
    write_map(path, torch.arange(27, dtype=torch.float32).reshape(3, 3, 3), 2.5)
    status, out, _ = info(capsys, path)
    assert status == 0
    assert "MRC map" in out and "3 x 3 x 3" in out and "2.5 A" in out and "0 / 26" in out


def test_info_bad_files_exit_2(capsys, shared_data, tmp_path):
    good = (shared_data / "formats" / "sample.mrcs").read_bytes()
    cut = tmp_path / "cut.mrcs"
    cut.write_bytes(good[:50_000])
    status, out, err = info(capsys, cut)
    assert status == 2 and out == ""
    assert err.startswith(f"cryostoch: error: {cut}: truncated MRC") and err.count("\n") == 1

    star = tmp_path / "nodefocus.star"
    star.write_text("data_\n\nloop_\n_rlnImageName\n_rlnVoltage\n1@cut.mrcs 300\n")
    status, _, err = info(capsys, star)
    assert status == 2 and "missing CTF columns" in err and err.count("\n") == 1

    status, _, err = info(capsys, tmp_path / "absent.star")
    assert status == 2 and "no such file" in err

    status, _, err = info(capsys, "--project-root", tmp_path, tmp_path / "x.txt")
    assert status == 2


@pytest.mark.parametrize("name", ["empiar_10076_7.star", "empiar_10076_7.cs", "relion31.star"])
def test_info_other_particle_files(capsys, shared_data, name):
    status, out, _ = info(capsys, shared_data / "formats" / name)
    assert status == 0 and "Usable:             yes" in out
