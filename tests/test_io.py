"""cryostoch.io against independent readers (mrcfile, starfile, np.load) and the real files."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryostoch.errors import InputError
from cryostoch.io import (
    Poses,
    StackWriter,
    open_particles,
    open_stack,
    read_header,
    read_map,
    read_particle_table,
    write_map,
    write_particles_star,
)
from cryostoch.io._euler import (
    cryosparc_rotvec_to_relion_euler,
    matrix_to_relion_euler,
    relion_euler_to_matrix,
)

FORMATS = "formats"
BETAGAL = "betagal_empiar10204"


# -- independent references ---------------------------------------------------------------------
def mrc_images(path: Path) -> np.ndarray:
    """All images of a stack, read by mrcfile alone (permissive: one file lacks the map ID)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32)
    return data if data.ndim == 3 else data[None]


def relion_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's Euler_angles2matrix as written in docs/conventions.md (passive Rz Ry Rz)."""

    def rz(a: float) -> np.ndarray:
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])

    def ry(b: float) -> np.ndarray:
        c, s = math.cos(b), math.sin(b)
        return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])

    return rz(math.radians(psi)) @ ry(math.radians(tilt)) @ rz(math.radians(rot))


def rodrigues(rotvec: np.ndarray) -> np.ndarray:
    """Active rotation by |v| radians about v / |v| (Rodrigues' formula)."""
    theta = float(np.linalg.norm(rotvec))
    if theta < 1e-15:
        return np.eye(3)
    kx, ky, kz = rotvec / theta
    k = np.array([[0.0, -kz, ky], [kz, 0.0, -kx], [-ky, kx, 0.0]])
    return np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)


def image_refs(star_path: Path, root: Path) -> tuple[np.ndarray, list[Path]]:
    """(0-based index, stack path) of every particle, parsed here from rlnImageName."""
    blocks = starfile.read(star_path, always_dict=True)
    table = blocks["particles"] if "particles" in blocks else next(iter(blocks.values()))
    index, paths = [], []
    for name in table["rlnImageName"]:
        i, p = str(name).split("@")
        index.append(int(i) - 1)
        paths.append(root / p)
    return np.array(index), paths


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(err.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, (needle, text)


# -- Euler angles ------------------------------------------------------------------------------
def test_relion_euler_matrix_matches_conventions():
    rng = np.random.default_rng(1)
    euler = np.column_stack(
        [rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)]
    )
    ours = relion_euler_to_matrix(euler)
    for e, a in zip(euler, ours, strict=True):
        np.testing.assert_allclose(a, relion_matrix(*e), atol=1e-12)
    back = matrix_to_relion_euler(ours)
    np.testing.assert_allclose(relion_euler_to_matrix(back), ours, atol=1e-10)
    assert (back[:, 1] >= 0).all() and (back[:, 1] <= 180).all()


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_matrix_to_euler_gimbal_lock(tilt):
    a = relion_matrix(30.0, tilt, 50.0)
    back = matrix_to_relion_euler(a[None])
    np.testing.assert_allclose(relion_euler_to_matrix(back)[0], a, atol=1e-10)


def test_cryosparc_rotvec_gives_transposed_matrix():
    rng = np.random.default_rng(2)
    rotvec = rng.normal(size=(40, 3))
    rotvec *= (rng.uniform(0, math.pi, 40) / np.linalg.norm(rotvec, axis=1))[:, None]
    euler = cryosparc_rotvec_to_relion_euler(rotvec)
    for v, e in zip(rotvec, euler, strict=True):
        np.testing.assert_allclose(relion_matrix(*e), rodrigues(v).T, atol=1e-10)


# -- MRC ------------------------------------------------------------------------------------------
def test_map_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    volume = torch.from_numpy(rng.normal(size=(6, 7, 8)).astype(np.float32))
    path = tmp_path / "map.mrc"
    write_map(path, volume, 1.73)
    out, voxel = read_map(path)
    assert out.dtype == torch.float32 and out.shape == (6, 7, 8)
    assert torch.equal(out, volume)
    assert voxel == pytest.approx(1.73, rel=1e-6)
    with mrcfile.open(path) as mrc:  # independent reader, strict mode
        assert mrc.data.dtype == np.float32
        np.testing.assert_array_equal(mrc.data, volume.numpy())
        assert float(mrc.voxel_size.x) == pytest.approx(1.73, rel=1e-6)
        assert float(mrc.header.dmax) == pytest.approx(float(volume.max()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.mrc"]


def test_write_map_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "map.mrc"
    write_map(path, torch.ones(4, 4, 4), 2.0)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("cryostoch.io.mrc.mrcfile.new", broken)
    with pytest.raises(RuntimeError):
        write_map(path, torch.zeros(4, 4, 4), 2.0)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["map.mrc"]


@pytest.mark.parametrize("dtype, mode", [(np.float16, 12), (np.float32, 2)])
def test_stack_writer_round_trip(tmp_path, dtype, mode):
    rng = np.random.default_rng(3)
    images = rng.normal(size=(10, 16, 16)).astype(dtype)
    path = tmp_path / "stack.mrcs"
    with StackWriter(path, 10, 16, dtype=dtype, pixel_size_a=2.5) as writer:
        assert not path.exists()  # nothing that looks complete before close
        writer.write(6, torch.from_numpy(images[6:].astype(np.float32)))
        writer.write(0, images[:6])
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == mode
        assert mrc.data.dtype == dtype
        assert mrc.is_image_stack()
        np.testing.assert_array_equal(mrc.data, images)
        assert float(mrc.voxel_size.x) == pytest.approx(2.5)
        as64 = images.astype(np.float64)
        assert float(mrc.header.dmin) == pytest.approx(as64.min(), rel=1e-6)
        assert float(mrc.header.dmean) == pytest.approx(as64.mean(), rel=1e-4, abs=1e-6)
        assert float(mrc.header.rms) == pytest.approx(as64.std(), rel=1e-4)
    with open_stack(path) as stack:
        assert len(stack) == 10 and stack.image_shape == (16, 16)
        assert stack.pixel_size_a == pytest.approx(2.5)
        np.testing.assert_array_equal(stack.read([7, 2, 2]), images[[7, 2, 2]].astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.mrcs"]


def test_stack_writer_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "stack.mrcs"
    with pytest.raises(RuntimeError), StackWriter(path, 4, 8, np.float16, 1.0) as writer:
        writer.write(0, np.zeros((2, 8, 8)))
        raise RuntimeError("crash in the middle")
    with pytest.raises(ValueError, match="never written"), StackWriter(path, 4, 8) as writer:
        writer.write(0, np.zeros((3, 8, 8)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0, 1, 2, 6, 12])
def test_open_stack_modes(tmp_path, mode):
    dtype = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}[mode]
    data = (np.arange(3 * 5 * 5).reshape(3, 5, 5) % 100).astype(dtype)
    path = tmp_path / f"mode{mode}.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 1.5
    with open_stack(path) as stack:
        assert stack.header.mode == mode
        np.testing.assert_array_equal(stack.read(), data.astype(np.float32))


def test_truncated_mrc(tmp_path, shared_data):
    good = (shared_data / FORMATS / "sample.mrcs").read_bytes()
    cut = tmp_path / "cut.mrcs"
    cut.write_bytes(good[: len(good) - 10_000])
    with pytest.raises(InputError) as err:
        open_stack(cut)
    assert_one_line(err, str(cut), "truncated MRC", "17 x 200 x 200", str(len(good) - 10_000))
    with pytest.raises(InputError) as err:
        read_map(cut)
    assert_one_line(err, "truncated MRC")
    short = tmp_path / "short.mrc"
    short.write_bytes(good[:300])
    with pytest.raises(InputError) as err:
        read_header(short)
    assert_one_line(err, str(short), "truncated MRC")
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"x" * 5000)
    with pytest.raises(InputError) as err:
        read_header(junk)
    assert_one_line(err, str(junk), "not an MRC file")


# -- the reference files ------------------------------------------------------------------------
def test_relion31_star(shared_data):
    star = shared_data / FORMATS / "relion31.star"
    ds = open_particles(star)
    ref = starfile.read(star, always_dict=True)
    particles, optics = ref["particles"], ref["optics"]
    assert len(ds) == ds.n_particles == 5
    assert ds.box_size == 256 and ds.pixel_size_a == pytest.approx(2.806)
    assert ds.kind == "star" and ds.optics_table is not None
    (g,) = ds.optics_groups
    assert (g.name, g.number, g.voltage_kv, g.spherical_aberration_mm, g.amplitude_contrast) == (
        "opticsGroup1",
        1,
        300.0,
        0.01,
        0.1,
    )
    np.testing.assert_array_equal(ds.optics_group, np.ones(5))
    np.testing.assert_allclose(ds.ctf.defocus_u_a.numpy(), particles["rlnDefocusU"])
    np.testing.assert_allclose(ds.ctf.defocus_v_a.numpy(), particles["rlnDefocusV"])
    np.testing.assert_allclose(ds.ctf.defocus_angle_deg.numpy(), particles["rlnDefocusAngle"])
    np.testing.assert_allclose(ds.ctf.voltage_kv.numpy(), optics["rlnVoltage"].iloc[0])
    np.testing.assert_allclose(ds.ctf.bfactor_a2.numpy(), particles["rlnCtfBfactor"])
    np.testing.assert_allclose(ds.ctf.scale.numpy(), particles["rlnCtfScalefactor"])
    assert ds.ctf.defocus_u_a.dtype == torch.float64
    euler = particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    np.testing.assert_allclose(ds.poses.euler_deg.numpy(), euler)
    origin_px = particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 2.806
    np.testing.assert_allclose(ds.poses.shifts_px.numpy(), -origin_px)
    pd.testing.assert_frame_equal(ds.metadata, particles.reset_index(drop=True))
    index, paths = image_refs(star, star.parent)
    stack = mrc_images(paths[0])
    np.testing.assert_array_equal(ds.read_images([4, 0, 2]).numpy(), stack[index[[4, 0, 2]]])


def test_relion30_star_sample(shared_data):
    star = shared_data / FORMATS / "sample_relion_data.star"
    ds = open_particles(star)
    (particles,) = starfile.read(star, always_dict=True).values()
    assert len(ds) == 17 and ds.box_size == 200 and ds.optics_table is None
    # no pixel size column: detector pixel (um) * 1e4 / magnification
    assert ds.pixel_size_a == pytest.approx(5.0 * 1e4 / 37369.207031)
    (g,) = ds.optics_groups
    assert (g.voltage_kv, g.spherical_aberration_mm, g.amplitude_contrast) == (300.0, 2.7, 0.1)
    np.testing.assert_allclose(ds.ctf.defocus_u_a.numpy(), particles["rlnDefocusU"])
    np.testing.assert_allclose(ds.ctf.defocus_v_a.numpy(), particles["rlnDefocusV"])
    np.testing.assert_allclose(ds.poses.euler_deg[:, 2].numpy(), particles["rlnAnglePsi"])
    np.testing.assert_allclose(ds.poses.euler_deg[:, 0].numpy(), particles["rlnAngleRot"])
    np.testing.assert_allclose(
        ds.poses.shifts_px.numpy(), -particles[["rlnOriginX", "rlnOriginY"]].to_numpy()
    )
    index, paths = image_refs(star, star.parent)
    np.testing.assert_array_equal(
        ds.read_images(np.arange(17)).numpy(), mrc_images(paths[0])[index]
    )


def test_six_optics_groups(shared_data):
    star = shared_data / FORMATS / "relion31.6opticsgroups.star"
    ref = starfile.read(star, always_dict=True)
    table = read_particle_table(star, check_images=False)
    assert len(table) == 139
    assert [g.name for g in table.optics_groups] == list(ref["optics"]["rlnOpticsGroupName"])
    assert [g.pixel_size_a for g in table.optics_groups] == list(ref["optics"]["rlnImagePixelSize"])
    assert [g.spherical_aberration_mm for g in table.optics_groups] == list(
        ref["optics"]["rlnSphericalAberration"]
    )
    assert all(g.box_size == 196 for g in table.optics_groups)
    np.testing.assert_array_equal(table.optics_group, ref["particles"]["rlnOpticsGroup"])
    by_number = dict(
        zip(ref["optics"]["rlnOpticsGroup"], ref["optics"]["rlnImagePixelSize"], strict=True)
    )
    expected = [by_number[g] for g in ref["particles"]["rlnOpticsGroup"]]
    np.testing.assert_allclose(table.pixel_size_a, expected)
    cs_by_number = dict(
        zip(ref["optics"]["rlnOpticsGroup"], ref["optics"]["rlnSphericalAberration"], strict=True)
    )
    np.testing.assert_allclose(
        table.ctf.spherical_aberration_mm.numpy(),
        [cs_by_number[g] for g in ref["particles"]["rlnOpticsGroup"]],
    )
    assert len(table.missing_stacks) == len(table.stacks) > 0  # metadata only
    with pytest.raises(InputError) as err:
        open_particles(star, check_images=False)
    assert_one_line(err, str(star), "different pixel sizes", "1.24", "1.25")
    with pytest.raises(InputError) as err:
        open_particles(star)
    assert_one_line(err, str(star), "Polish/job520/Micrographs/0003_shiny.mrcs", "does not exist")


def test_empiar10076_star_and_cs_agree(shared_data):
    star_path = shared_data / FORMATS / "empiar_10076_7.star"
    cs_path = shared_data / FORMATS / "empiar_10076_7.cs"
    star, cs = open_particles(star_path), open_particles(cs_path)
    raw = np.load(cs_path)
    assert len(star) == len(cs) == 7
    assert star.box_size == cs.box_size == 320
    assert star.pixel_size_a == pytest.approx(5e4 / 38168, rel=1e-9)
    assert cs.pixel_size_a == pytest.approx(float(raw["blob/psize_A"][0]))
    assert star.pixel_size_a == pytest.approx(cs.pixel_size_a, rel=1e-6)
    # CTF: the same values (the .cs stores float32 and radians)
    for field, atol in [
        ("defocus_u_a", 0.01),
        ("defocus_v_a", 0.01),
        ("defocus_angle_deg", 1e-5),
        ("voltage_kv", 0),
        ("spherical_aberration_mm", 1e-6),
        ("amplitude_contrast", 1e-7),
        ("phase_shift_deg", 0),
        ("bfactor_a2", 0),
        ("scale", 0),
    ]:
        np.testing.assert_allclose(
            getattr(cs.ctf, field).numpy(), getattr(star.ctf, field).numpy(), atol=atol, rtol=0
        )
    np.testing.assert_allclose(cs.ctf.defocus_u_a.numpy(), raw["ctf/df1_A"])
    np.testing.assert_allclose(
        cs.ctf.defocus_angle_deg.numpy(), np.rad2deg(raw["ctf/df_angle_rad"])
    )
    # the same images, read through both files and by mrcfile
    stack = mrc_images(shared_data / FORMATS / "empiar_10076_7.mrc")
    np.testing.assert_array_equal(star.read_images(np.arange(7)).numpy(), stack)
    np.testing.assert_array_equal(cs.read_images(np.arange(7)).numpy(), stack[raw["blob/idx"]])
    # Neither file carries poses, so this pair cannot pin down the pose convention.
    assert star.poses is None and cs.poses is None


def test_cryosparc_p12_metadata(shared_data):
    path = shared_data / FORMATS / "cryosparc_P12_J24_001_particles.cs"
    raw = np.load(path)
    with pytest.raises(InputError) as err:
        open_particles(path)  # the stacks are not shipped
    assert_one_line(err, str(path), "J19/extract/", "does not exist")
    ds = open_particles(path, check_images=False)
    assert len(ds) == 2019 and ds.box_size == 180
    assert ds.pixel_size_a == pytest.approx(2.95, rel=1e-6)
    assert not ds.has_images
    (g,) = ds.optics_groups
    assert g.voltage_kv == 200.0 and g.spherical_aberration_mm == 2.0
    assert g.amplitude_contrast == pytest.approx(0.07)
    np.testing.assert_allclose(ds.ctf.defocus_u_a.numpy(), raw["ctf/df1_A"])
    np.testing.assert_allclose(ds.ctf.defocus_v_a.numpy(), raw["ctf/df2_A"])
    np.testing.assert_allclose(
        ds.ctf.defocus_angle_deg.numpy(), np.rad2deg(raw["ctf/df_angle_rad"])
    )
    np.testing.assert_allclose(ds.poses.shifts_px.numpy(), -raw["alignments3D/shift"])
    a = relion_euler_to_matrix(ds.poses.euler_deg.numpy())
    for i in range(0, 2019, 97):
        np.testing.assert_allclose(
            a[i], rodrigues(raw["alignments3D/pose"][i].astype(float)).T, atol=1e-6
        )
    assert ds.metadata.shape[0] == 2019 and "alignments3D/pose/2" in ds.metadata.columns
    assert ds.metadata["blob/path"].iloc[0] == raw["blob/path"][0].decode()
    with pytest.raises(InputError) as err:
        ds.read_images([0])
    assert_one_line(err, "J19/extract/")


def test_ctf_table_star_metadata_only(shared_data):
    path = shared_data / "ctf" / "empiar10049_ctf.star"
    ref = starfile.read(path, always_dict=True)["particles"]
    ds = open_particles(path, check_images=False)
    assert len(ds) == 654 and ds.box_size == 0 and ds.pixel_size_a == pytest.approx(1.23)
    np.testing.assert_allclose(ds.ctf.defocus_u_a.numpy(), ref["rlnDefocusU"])
    np.testing.assert_allclose(ds.ctf.voltage_kv.numpy(), 300.0)
    with pytest.raises(InputError, match="no rlnImageName"):
        open_particles(path)


def test_betagal(shared_data):
    root = shared_data / BETAGAL
    star = root / "Extract" / "job009" / "particles.star"
    ds = open_particles(star)
    ref = starfile.read(star, always_dict=True)["particles"]
    assert len(ds) == 2374 and ds.box_size == 64 and ds.pixel_size_a == pytest.approx(3.54)
    (g,) = ds.optics_groups
    assert (g.voltage_kv, g.spherical_aberration_mm, g.amplitude_contrast) == (200.0, 1.4, 0.1)
    assert (g.pixel_size_a, g.box_size) == (3.54, 64)
    assert ds.poses is None  # only rlnAnglePsi: no 3-D poses
    assert len(ds.stacks) == 10 and all(s.header.mode == 12 for s in ds.stacks)
    np.testing.assert_allclose(ds.ctf.defocus_u_a.numpy(), ref["rlnDefocusU"])
    np.testing.assert_allclose(ds.ctf.defocus_angle_deg.numpy(), ref["rlnDefocusAngle"])
    # images: paths relative to betagal_empiar10204/, two folders above the STAR file
    index, paths = image_refs(star, root)
    stacks = {p: mrc_images(p) for p in set(paths)}
    rng = np.random.default_rng(4)
    pick = rng.permutation(len(ds))[:300]
    images = ds.read_images(pick)
    assert images.dtype == torch.float32 and images.shape == (300, 64, 64)
    expected = np.stack([stacks[paths[i]][index[i]] for i in pick])
    np.testing.assert_array_equal(images.numpy(), expected)
    seen = []
    for chunk, batch in ds.iter_chunks(1000, indices=pick):
        assert batch.shape[0] == chunk.size <= 1000
        np.testing.assert_array_equal(batch.numpy(), ds.read_images(chunk).numpy())
        seen.append(chunk)
    np.testing.assert_array_equal(np.concatenate(seen), pick)
    # a subset is a view: same files, fewer rows
    sub = ds.subset(pick[:20])
    assert len(sub) == 20 and sub.stacks is ds.stacks
    np.testing.assert_array_equal(sub.source_rows, pick[:20])
    np.testing.assert_array_equal(sub.read_images(np.arange(20)).numpy(), expected[:20])
    np.testing.assert_array_equal(
        sub.ctf.defocus_u_a.numpy(), ref["rlnDefocusU"].to_numpy()[pick[:20]]
    )
    assert list(sub.metadata["rlnImageName"]) == list(ref["rlnImageName"].iloc[pick[:20]])
    # an explicit project root works; a wrong one says where it looked
    assert len(open_particles(star, project_root=root)) == 2374
    with pytest.raises(InputError) as err:
        open_particles(star, project_root=star.parent)
    assert_one_line(err, str(star), "Extract/job009/Movies/", str(star.parent))


def test_betagal_class2d_poses(shared_data):
    star = shared_data / BETAGAL / "Class2D" / "job010" / "run_it025_data.star"
    ds = open_particles(star)
    ref = starfile.read(star, always_dict=True)["particles"]
    assert len(ds) == 2374 and ds.poses is not None
    np.testing.assert_allclose(ds.poses.euler_deg[:, 2].numpy(), ref["rlnAnglePsi"])
    np.testing.assert_allclose(
        ds.poses.shifts_px.numpy(), -ref[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 3.54
    )


def test_bare_stack(shared_data, tmp_path):
    ds = open_particles(shared_data / FORMATS / "relion31.mrcs")
    assert len(ds) == 5 and ds.box_size == 256 and ds.ctf is None and ds.poses is None
    assert ds.pixel_size_a == 1.0
    np.testing.assert_array_equal(
        ds.read_images([3, 1]).numpy(), mrc_images(shared_data / FORMATS / "relion31.mrcs")[[3, 1]]
    )
    with pytest.raises(InputError, match="no pixel size"):
        open_particles(shared_data / FORMATS / "sample.mrcs")  # header voxel size 0


# -- STAR writing -------------------------------------------------------------------------------
def test_write_particles_star_round_trip(shared_data, tmp_path):
    src = open_particles(shared_data / FORMATS / "relion31.star")
    particles = src.metadata.copy()
    stack = (shared_data / FORMATS / "relion31.mrcs").resolve()
    particles["rlnImageName"] = [f"{i:06d}@{stack}" for i in range(1, 6)]  # absolute paths
    out = tmp_path / "out.star"
    write_particles_star(out, src.optics_table, particles)
    assert [p.name for p in tmp_path.iterdir()] == ["out.star"]
    ref = starfile.read(out, always_dict=True)
    assert set(ref) == {"optics", "particles"}
    pd.testing.assert_frame_equal(ref["optics"], src.optics_table, check_dtype=False)
    numeric = particles.select_dtypes("number").columns
    np.testing.assert_allclose(ref["particles"][numeric].to_numpy(), particles[numeric].to_numpy())
    back = open_particles(out)
    assert back.pixel_size_a == src.pixel_size_a and back.box_size == src.box_size
    torch.testing.assert_close(back.poses.euler_deg, src.poses.euler_deg)
    torch.testing.assert_close(back.poses.shifts_px, src.poses.shifts_px)
    torch.testing.assert_close(back.ctf.defocus_u_a, src.ctf.defocus_u_a)
    np.testing.assert_array_equal(back.read_images([0, 4]).numpy(), src.read_images([0, 4]).numpy())


def test_write_particles_star_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "out.star"
    out.write_text("old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cryostoch.io.star.starfile.write", broken)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0]})
    with pytest.raises(OSError):
        write_particles_star(out, optics, pd.DataFrame({"rlnDefocusU": [1.0]}))
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.star"]


# -- bad input ----------------------------------------------------------------------------------
STAR_30 = """data_

loop_
_rlnImageName
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnImagePixelSize
{rows}
"""


def star_30(tmp_path: Path, rows: list[str], name: str = "bad.star") -> Path:
    path = tmp_path / name
    path.write_text(STAR_30.format(rows="\n".join(rows)))
    return path


def row(image: str, du: str = "15000", dv: str = "14000", volt: str = "300") -> str:
    return f"{image} {du} {dv} 10 {volt} 2.7 0.1 1.31"


@pytest.fixture
def sample_stack(shared_data, tmp_path) -> Path:
    """A copy-free symlink to the 17-image stack inside tmp_path."""
    link = tmp_path / "sample.mrcs"
    link.symlink_to(shared_data / FORMATS / "sample.mrcs")
    return link


def test_star_index_beyond_stack(tmp_path, sample_stack):
    star = star_30(tmp_path, [row("1@sample.mrcs"), row("18@sample.mrcs")])
    with pytest.raises(InputError) as err:
        open_particles(star)
    assert_one_line(err, str(star), "sample.mrcs", "image 18", "only 17 images")


def test_star_without_defocus(tmp_path, sample_stack):
    star = tmp_path / "nodefocus.star"
    star.write_text("data_\n\nloop_\n_rlnImageName\n_rlnVoltage\n1@sample.mrcs 300\n")
    with pytest.raises(InputError) as err:
        open_particles(star)
    assert_one_line(err, str(star), "missing CTF columns", "rlnDefocusU", "rlnDefocusV")


def test_star_missing_stack(tmp_path, sample_stack):
    star = star_30(tmp_path, [row("1@sample.mrcs"), row("1@Extract/none.mrcs")])
    with pytest.raises(InputError) as err:
        open_particles(star)
    assert_one_line(err, str(star), "Extract/none.mrcs", "does not exist", str(tmp_path))


def test_star_truncated_stack(tmp_path, shared_data):
    good = (shared_data / FORMATS / "sample.mrcs").read_bytes()
    (tmp_path / "cut.mrcs").write_bytes(good[:5000])
    star = star_30(tmp_path, [row("1@cut.mrcs")])
    with pytest.raises(InputError) as err:
        open_particles(star)
    assert_one_line(err, str(tmp_path / "cut.mrcs"), "truncated MRC", str(star))


@pytest.mark.parametrize(
    "bad_row, needle",
    [
        (row("2@sample.mrcs", du="nan"), "rlnDefocusU is NaN or infinite"),
        (row("2@sample.mrcs", dv="inf"), "rlnDefocusV is NaN or infinite"),
        (row("2@sample.mrcs", volt="0"), "rlnVoltage must be positive"),
        (row("x@sample.mrcs"), "not 'index@stack'"),
    ],
)
def test_star_bad_values(tmp_path, sample_stack, bad_row, needle):
    star = star_30(tmp_path, [row("1@sample.mrcs"), bad_row])
    with pytest.raises(InputError) as err:
        open_particles(star)
    assert_one_line(err, str(star), needle)


def test_cs_nan_defocus(tmp_path, shared_data):
    data = np.load(shared_data / FORMATS / "empiar_10076_7.cs")
    data["ctf/df1_A"][3] = np.nan
    (tmp_path / "empiar_10076_7.mrc").symlink_to(shared_data / FORMATS / "empiar_10076_7.mrc")
    path = tmp_path / "bad.cs"
    with open(path, "wb") as f:
        np.save(f, data)
    with pytest.raises(InputError) as err:
        open_particles(path)
    assert_one_line(err, str(path), "ctf/df1_A is NaN", "particle 4")


def test_not_a_file_type(tmp_path):
    junk = tmp_path / "junk.cs"
    junk.write_bytes(b"not numpy")
    with pytest.raises(InputError) as err:
        open_particles(junk)
    assert_one_line(err, str(junk), "cryoSPARC")
    with pytest.raises(InputError, match="no such file"):
        open_particles(tmp_path / "absent.star")
    with pytest.raises(InputError, match="unknown particle file type"):
        open_particles(junk.rename(tmp_path / "junk.txt"))


# -- export and other paths ---------------------------------------------------------------------
def test_relion_tables_from_relion30(shared_data, tmp_path):
    src = open_particles(shared_data / FORMATS / "sample_relion_data.star")
    sub = src.subset(np.array([16, 3, 5]))
    new_poses = Poses(
        torch.tensor([[10.0, 20.0, 30.0], [0.0, 90.0, -45.0], [-170.0, 135.0, 5.0]]),
        torch.tensor([[1.5, -2.0], [0.0, 0.25], [-3.0, 4.0]], dtype=torch.float64),
    )
    optics, particles = sub.relion_tables(poses=new_poses)
    assert "rlnVoltage" not in particles and "rlnOriginX" not in particles
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(src.pixel_size_a)
    out = tmp_path / "poses.star"
    write_particles_star(out, optics, particles)
    back = open_particles(out)
    assert back.optics_table is not None and len(back) == 3
    assert back.pixel_size_a == pytest.approx(src.pixel_size_a)
    torch.testing.assert_close(back.poses.euler_deg, new_poses.euler_deg.double())
    torch.testing.assert_close(back.poses.shifts_px, new_poses.shifts_px)
    for field in ("defocus_u_a", "defocus_v_a", "voltage_kv", "spherical_aberration_mm"):
        torch.testing.assert_close(getattr(back.ctf, field), getattr(sub.ctf, field))
    np.testing.assert_array_equal(
        back.read_images([0, 1, 2]).numpy(), src.read_images([16, 3, 5]).numpy()
    )


def test_relion_tables_from_cs(shared_data, tmp_path):
    src = open_particles(shared_data / FORMATS / "empiar_10076_7.cs")
    optics, particles = src.relion_tables()
    out = tmp_path / "from_cs.star"
    write_particles_star(out, optics, particles)
    back = open_particles(out)
    assert back.poses is None and back.box_size == 320
    assert back.pixel_size_a == pytest.approx(src.pixel_size_a, rel=1e-6)
    torch.testing.assert_close(back.ctf.defocus_u_a, src.ctf.defocus_u_a)
    torch.testing.assert_close(back.ctf.defocus_angle_deg, src.ctf.defocus_angle_deg)
    np.testing.assert_array_equal(back.read_images([6, 0]).numpy(), src.read_images([6, 0]).numpy())


def test_cs_project_paths_and_alignment_pixel_size(shared_data, tmp_path):
    """'>'-prefixed blob paths resolve against an ancestor; shifts in alignment pixels are
    converted to pixels of the blob."""
    mrc = shared_data / FORMATS / "empiar_10076_7.mrc"
    (tmp_path / "J1" / "imported").mkdir(parents=True)
    (tmp_path / "J1" / "imported" / "particles.mrc").symlink_to(mrc)
    (tmp_path / "J5").mkdir()
    n = 3
    dtype = [
        ("blob/path", "S40"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"),
        ("alignments3D/pose", "<f4", (3,)),
        ("alignments3D/shift", "<f4", (2,)),
        ("alignments3D/psize_A", "<f4"),
    ]
    data = np.zeros(n, dtype=dtype)
    data["blob/path"] = b">J1/imported/particles.mrc"
    data["blob/idx"] = [6, 0, 2]
    data["blob/shape"] = 320
    data["blob/psize_A"] = 1.0
    data["ctf/accel_kv"], data["ctf/cs_mm"], data["ctf/amp_contrast"] = 300, 2.7, 0.1
    data["ctf/df1_A"], data["ctf/df2_A"] = 20000, 19000
    data["ctf/phase_shift_rad"] = [0, math.pi / 2, 0]
    data["alignments3D/pose"] = [[0.1, 0.2, 0.3], [0, 0, 0], [-1.0, 0.5, 2.0]]
    data["alignments3D/shift"] = [[1, 2], [0, 0], [-3, 0.5]]
    data["alignments3D/psize_A"] = 2.0  # aligned at twice the pixel size
    path = tmp_path / "J5" / "particles.cs"
    with open(path, "wb") as f:
        np.save(f, data)
    ds = open_particles(path)
    np.testing.assert_array_equal(ds.read_images([0, 2]).numpy(), mrc_images(mrc)[[6, 2]])
    np.testing.assert_allclose(ds.poses.shifts_px.numpy(), -2 * data["alignments3D/shift"])
    np.testing.assert_allclose(ds.ctf.phase_shift_deg.numpy(), [0, 90, 0], atol=1e-5)
    a = relion_euler_to_matrix(ds.poses.euler_deg.numpy())
    for i in range(n):
        np.testing.assert_allclose(
            a[i], rodrigues(data["alignments3D/pose"][i].astype(float)).T, atol=1e-6
        )
    with pytest.raises(InputError) as err:
        open_particles(path, project_root=tmp_path / "J5")
    assert_one_line(err, "J1/imported/particles.mrc", str(tmp_path / "J5"))


def test_big_endian_stack(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.normal(size=(2, 6, 6)).astype(np.float32)
    little = tmp_path / "little.mrcs"
    with mrcfile.new(little) as mrc:
        mrc.set_data(images)
        mrc.voxel_size = 1.25
    raw = little.read_bytes()
    header = np.frombuffer(raw[:1024], dtype=mrcfile.dtypes.HEADER_DTYPE)
    big_header = header.astype(header.dtype.newbyteorder(">"))
    big_header["machst"] = [0x11, 0x11, 0, 0]
    big = tmp_path / "big.mrcs"
    big.write_bytes(big_header.tobytes() + images.astype(">f4").tobytes())
    with open_stack(big) as stack:
        assert stack.pixel_size_a == pytest.approx(1.25)
        np.testing.assert_array_equal(stack.read(), images)


def test_dataset_pickles(shared_data):
    import pickle

    ds = open_particles(shared_data / FORMATS / "relion31.star")
    first = ds.read_images([1])
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.read_images([1]).numpy(), first.numpy())
    ds.close()
    np.testing.assert_array_equal(ds.read_images([1]).numpy(), first.numpy())  # reopens


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from cryostoch.io._common import default_file_mode
    from cryostoch.io.mrc import write_map

    write_map(tmp_path / "m.mrc", torch.zeros(4, 4, 4), 1.0)
    assert (os.stat(tmp_path / "m.mrc").st_mode & 0o777) == default_file_mode()


# -- the dataset as a view of one shared table ----------------------------------------------------
def test_subset_of_subset_shares_the_table(shared_data):
    star = shared_data / FORMATS / "sample_relion_data.star"
    ds = open_particles(star)
    ref = starfile.read(star, always_dict=True)
    (particles,) = ref.values()
    first = ds.subset(np.array([16, 3, 5, 8, 0]))
    second = first.subset([4, 1, 3])  # rows 0, 3, 8 of the file
    mask = np.array([True, False, True])
    third = second.subset(mask)  # rows 0, 8
    np.testing.assert_array_equal(second.source_rows, [0, 3, 8])
    np.testing.assert_array_equal(third.source_rows, [0, 8])
    # one table, one set of open stacks; a subset copies only its index array
    assert second.table is ds.table and third.table is ds.table
    assert third._cache is ds._cache and third.stacks is ds.stacks
    np.testing.assert_allclose(
        second.ctf.defocus_u_a.numpy(), particles["rlnDefocusU"].to_numpy()[[0, 3, 8]]
    )
    np.testing.assert_allclose(third.poses.euler_deg[:, 0].numpy(),
                               particles["rlnAngleRot"].to_numpy()[[0, 8]])
    assert list(third.metadata["rlnImageName"]) == list(particles["rlnImageName"].iloc[[0, 8]])
    assert list(third.metadata.index) == [0, 1]
    np.testing.assert_array_equal(third.read_images([1, 0]).numpy(),
                                  ds.read_images([8, 0]).numpy())
    backwards = ds.subset(slice(None, None, -1))
    np.testing.assert_array_equal(backwards.source_rows, np.arange(17)[::-1])
    np.testing.assert_allclose(backwards.ctf.defocus_v_a.numpy(),
                               particles["rlnDefocusV"].to_numpy()[::-1])
    with pytest.raises(IndexError):
        second.subset([3])
    with pytest.raises(IndexError):
        second.subset(np.ones(17, dtype=bool))


def test_relion_tables_function_is_the_method(shared_data):
    from cryostoch.io import relion_tables

    sub = open_particles(shared_data / FORMATS / "relion31.star").subset([4, 1])
    for got, want in zip(relion_tables(sub, absolute_paths=False),
                         sub.relion_tables(absolute_paths=False), strict=True):
        pd.testing.assert_frame_equal(got, want)


# -- 2-D classification -------------------------------------------------------------------------
def test_read_class_assignments(shared_data, tmp_path):
    from cryostoch.io import read_class_assignments

    star = shared_data / BETAGAL / "Class2D" / "job010" / "run_it025_data.star"
    ref = starfile.read(star, always_dict=True)["particles"]
    names, classes = read_class_assignments(star)
    assert names.shape == classes.shape == (2374,) and classes.dtype == np.int64
    assert list(names) == list(ref["rlnImageName"])
    np.testing.assert_array_equal(classes, ref["rlnClassNumber"])
    with pytest.raises(InputError) as err:
        read_class_assignments(shared_data / "ctf" / "empiar10049_ctf.star")
    assert_one_line(err, "needs rlnImageName and rlnClassNumber columns")
    with pytest.raises(InputError) as err:
        read_class_assignments(tmp_path / "absent.star")
    assert_one_line(err, str(tmp_path / "absent.star"), "no such STAR file")
    junk = tmp_path / "junk.star"
    junk.write_text("no blocks here\n")
    with pytest.raises(InputError) as err:
        read_class_assignments(junk)
    assert_one_line(err, str(junk), "STAR file")
    half = tmp_path / "half.star"
    half.write_text("data_particles\n\nloop_\n_rlnImageName\n_rlnClassNumber\n1@a.mrcs 2.5\n")
    with pytest.raises(InputError) as err:
        read_class_assignments(half)
    assert_one_line(err, "rlnClassNumber must be whole numbers")
