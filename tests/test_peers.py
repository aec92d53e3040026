"""benchmarks/peers (issue 16): the particle copy given to RELION and cryoDRGN, checked against
the simulated stack and STAR read independently (mrcfile, starfile), and the table's rows for a
measured, a never-crossing and a failed peer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryostoch.cli.main import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peers"))
import common  # noqa: E402
import run as peers_run  # noqa: E402


@pytest.fixture(scope="module")
def half_precision_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peers") / "sim"
    assert main(["simulate", "--volume", "phantom", "--n-particles", "20", "--box", "36",
                 "--pixel-size-a", "8", "--shift-sigma-a", "4", "--dtype", "float16",
                 "--out", str(out), "--montage", "0", "--quiet"]) == 0
    return out


def test_plain_copy_is_float32_without_poses(half_precision_set, tmp_path):
    star, stack = common.write_plain_copy(half_precision_set / "particles.star", tmp_path)
    with mrcfile.open(half_precision_set / "particles.mrcs", permissive=True) as source:
        assert source.header.mode == 12  # the case RELION 3.1 cannot read
        original = np.asarray(source.data, dtype=np.float32)
    with mrcfile.open(stack) as copy:
        assert copy.header.mode == 2 and copy.data.dtype == np.float32
        np.testing.assert_array_equal(copy.data, original)
        assert copy.voxel_size.x == pytest.approx(8.0)
    blocks = starfile.read(star, always_dict=True)
    before = starfile.read(half_precision_set / "particles.star", always_dict=True)
    particles, source_particles = blocks["particles"], before["particles"]
    assert not [c for c in particles.columns if c.startswith(("rlnAngle", "rlnOrigin"))]
    assert "rlnOriginXAngst" in source_particles.columns  # the truth was there to drop
    np.testing.assert_allclose(particles["rlnDefocusU"], source_particles["rlnDefocusU"])
    index, name = zip(*(n.split("@") for n in particles["rlnImageName"]), strict=True)
    assert set(name) == {stack.name}
    assert [int(i) for i in index] == list(range(1, 21))
    assert blocks["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(8.0)


def test_table_rows_say_what_was_measured():
    args = argparse.Namespace(n_particles=3000, note="two other jobs ran meanwhile")
    measured = {"method": "A", "wall_s": 12.34, "fsc05_a": 27.91, "fsc0143_a": None,
                "nyquist_a": 10.0, "mirrored": True, "settings": "x | y", "command": "a --b"}
    failed = {"method": "B", "status": "not run: relion_refine is not installed"}
    blob = dict(measured, method="C", fsc05_a=1001.9)
    text = peers_run.table_markdown([measured, failed, blob], args)
    assert "| C | 12 | below at the first shell (320 A) |" in text
    assert "| A | 12 | 27.9 | Nyquist (10 A) | mirrored | x / y |" in text
    assert "| B | - | - | - | - | not run: relion_refine is not installed |" in text
    assert "two other jobs ran meanwhile" in text and "`a --b`" in text


def test_cryodrgn_ai_command_and_last_volume(tmp_path):
    import cryodrgn_ai_peer

    command = cryodrgn_ai_peer.abinit_command(Path("cryodrgn"), Path("s.mrcs"), Path("c.pkl"),
                                              tmp_path, 2, 400, Path("i.pkl"), 1)
    pairs = dict(zip(command[5::2], command[6::2], strict=False))
    assert command[1] == "abinit" and "--uninvert-data" in command  # protein-white stack
    assert pairs["--zdim"] == "0" and pairs["--num-epochs"] == "2"
    assert pairs["--n-imgs-pose-search"] == "400" and pairs["--n-imgs-pretrain"] == "400"
    with pytest.raises(RuntimeError, match="no reconstruct"):
        cryodrgn_ai_peer.last_volume(tmp_path)
    for epoch in (0, 2, 10):  # numeric order, not text order
        (tmp_path / f"reconstruct.{epoch}.mrc").write_bytes(b"")
    assert cryodrgn_ai_peer.last_volume(tmp_path).name == "reconstruct.10.mrc"
