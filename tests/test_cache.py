"""--cache-dir (issue 15, part 2): the preprocessed particles on disk give the map of a run
that holds them in memory, are reused when nothing changed, rebuilt when something did or the
file is damaged, and are built and read in bounded memory."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from bad_input_support import refused
from cryostoch.cli.main import main
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.prepare import make_model, prepare_run
from cryostoch.engine.preprocess import stream_blocks
from cryostoch.engine.refine_data import RefineConfig, full_spectra
from cryostoch.io.cache import DamagedCache, DiskRows, open_rows, row_file
from cryostoch.io.mrc import open_stack
from distributed_support import (
    fsc_inside_cutoff,
    launch,
    needs_torchrun,
    reconstruct_args,
    simulated_particles,
)

RUN = ["--epochs", "0.3", "--batch-size", "40", "--max-freq", "0.2", "--test-size", "20",
       "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    """particles.star of 300 box-32 simulated particles."""
    return simulated_particles(tmp_path_factory.mktemp("cache") / "sim")


def config(particles: Path, cache: Path | None, max_freq: float = 0.2,
           **options) -> ReconstructionConfig:
    return ReconstructionConfig(particles=str(particles), out_dir="unused", max_freq=max_freq,
                                test_size=20, cache_dir=None if cache is None else str(cache),
                                **options)


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npy"))


# ------------------------------------------------------------------ io: the row files
def written(path: Path, array: np.ndarray, chunk: int) -> DiskRows:
    data = torch.from_numpy(array)
    with row_file(path, len(array), array.shape[1:], data.dtype) as writer:
        for start in range(0, len(array), chunk):
            writer.write(start, data[start:start + chunk])
    return open_rows(path, len(array), array.shape[1:], data.dtype)


def test_rows_read_back_as_numpy_indexes_them(tmp_path):
    """Any order, repeats, slices, masks and views of views: as numpy's fancy indexing of the
    array itself; the file is a standard .npy."""
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((97, 5, 3)) + 1j * rng.standard_normal((97, 5, 3))
             ).astype(np.complex64)
    rows = written(tmp_path / "a.npy", array, chunk=10)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array)
    picks = np.array([5, 4, 96, 0, 5, 6, 7, 8, 50])
    assert torch.equal(rows[torch.as_tensor(picks)], torch.from_numpy(array[picks]))
    assert torch.equal(rows[10:30:3], torch.from_numpy(array[10:30:3]))
    mask = rng.random(97) < 0.3
    assert torch.equal(rows[mask], torch.from_numpy(array[mask]))
    view = rows.subset(np.array([90, 3, 44, 12])).subset(torch.tensor([2, 0]))
    assert view.shape == (2, 5, 3) and len(view) == 2
    assert torch.equal(view[:], torch.from_numpy(array[[44, 90]]))


def test_a_short_or_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "a.npy"
    with pytest.raises(ValueError, match="3 of 4 rows"):
        with row_file(path, 4, (2,), torch.float32) as writer:
            writer.write(0, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="after 0 rows"):  # out of order
        with row_file(path, 4, (2,), torch.float32) as writer:
            writer.write(1, torch.zeros(3, 2))
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_or_foreign_file_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "a.npy"
    written(path, np.ones((20, 4), dtype=np.float32), chunk=7)
    with pytest.raises(DamagedCache, match="expected float32 \\(21, 4\\)"):
        open_rows(path, 21, (4,), torch.float32)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 8)
    with pytest.raises(DamagedCache, match="truncated"):
        open_rows(path, 20, (4,), torch.float32)
    path.write_bytes(b"not numpy")
    with pytest.raises(DamagedCache, match="not a readable .npy"):
        open_rows(path, 20, (4,), torch.float32)


# ------------------------------------------------------------------ bounded memory
class CountingReads:
    """A data set that records the size of every read."""

    def __init__(self, dataset) -> None:
        self._dataset = dataset
        self.reads: list[int] = []

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def __len__(self) -> int:
        return len(self._dataset)

    def iter_chunks(self, chunk_size, indices=None):
        for rows, images in self._dataset.iter_chunks(chunk_size, indices):
            self.reads.append(len(rows))
            yield rows, images


def test_building_the_cache_holds_one_chunk_of_images_at_a_time(particles, tmp_path):
    """The images are read, and the blocks written, in chunks of at most chunk_size in row
    order: the working set does not grow with the number of particles."""
    run = prepare_run(config(particles, None), progress=False)
    data = CountingReads(run.dataset)
    writes: list[tuple[int, int]] = []
    kept = []

    def write(start, blocks):
        writes.append((start, blocks.shape[0]))
        kept.append(blocks)

    stream_blocks(data, run.model, run.particles.statistics, run.geometry.particle_radius_px,
                  write, chunk_size=64)
    assert data.reads == [64, 64, 64, 64, 44]
    assert writes == [(0, 64), (64, 64), (128, 64), (192, 64), (256, 44)]
    assert torch.equal(torch.cat(kept), run.particles.blocks)  # the in-memory run's blocks


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only")
def test_streaming_a_stack_does_not_grow_the_resident_set(tmp_path):
    """Reading every image of a 32 MB stack leaves the process's file-backed resident memory
    where it was (images are read by position, not through a memory map left mapped)."""
    path = tmp_path / "big.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.ones((2000, 64, 64), dtype=np.float32))
    stack = open_stack(path)

    def rss_file_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
        pytest.skip("no RssFile in /proc/self/status")

    before = rss_file_mb()
    total = sum(float(stack.read(slice(start, start + 250)).sum())
                for start in range(0, 2000, 250))
    assert total == 2000 * 64 * 64
    assert rss_file_mb() - before < 8.0


# ------------------------------------------------------------------ runs
def test_a_cached_run_gives_the_map_of_an_in_memory_run_and_reuses_its_cache(
        particles, tmp_path, caplog):
    """Bit-identical maps: the cache holds the very numbers the in-memory run computes. The
    second cached run reads the file (no rebuild: same modification time, a log line)."""
    cache = tmp_path / "cache"
    maps = []
    for name, extra in (("ram", []), ("built", ["--cache-dir", str(cache)]),
                        ("reused", ["--cache-dir", str(cache)])):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(["reconstruct", str(particles), "--out", str(tmp_path / name),
                         *RUN, *extra]) == 0
        maps.append(mrcfile.read(tmp_path / name / "map.mrc"))
        if name == "built":
            assert "building the cache" in caplog.text
            (npy,) = cache_files(cache)
            stamp = npy.stat().st_mtime_ns
    assert "reusing the cache" in caplog.text and "building" not in caplog.text
    assert npy.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(maps[0], maps[1])
    np.testing.assert_array_equal(maps[0], maps[2])


def test_a_changed_setting_or_particle_file_builds_another_cache(particles, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_run(config(particles, cache), progress=False)
    (npy,) = cache_files(cache)
    again = prepare_run(config(particles, cache), progress=False)
    assert cache_files(cache) == [npy]
    assert torch.equal(again.particles.blocks[:], first.particles.blocks[:])
    prepare_run(config(particles, cache, particle_diameter_a=150.0), progress=False)
    assert len(cache_files(cache)) == 2  # another normalisation region: another file
    os.utime(particles)  # the particle file touched: it may have changed
    prepare_run(config(particles, cache), progress=False)
    assert len(cache_files(cache)) == 3


def test_a_damaged_cache_is_rebuilt_never_used(particles, tmp_path, caplog):
    cache = tmp_path / "cache"
    memory = prepare_run(config(particles, None), progress=False)
    prepare_run(config(particles, cache), progress=False)
    (npy,) = cache_files(cache)
    with open(npy, "r+b") as handle:
        handle.truncate(npy.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        rebuilt = prepare_run(config(particles, cache), progress=False)
    assert "truncated" in caplog.text and str(npy) in caplog.text
    assert torch.equal(rebuilt.particles.blocks[:], memory.particles.blocks)
    npy.with_suffix(".json").write_text("{")  # a broken record: its file is not trusted
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_run(config(particles, cache), progress=False)
    assert "no matching record" in caplog.text


def test_an_unusable_cache_dir_is_refused_in_one_line(particles, tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    refused(capsys, ["reconstruct", str(particles), "--out", str(tmp_path / "run"), *RUN,
                     "--cache-dir", str(not_a_folder)], "--cache-dir", str(not_a_folder))
    assert not (tmp_path / "run").exists()


def test_refine_spectra_from_the_cache_are_those_in_memory(particles, tmp_path):
    refine = RefineConfig(particles=str(particles), out_dir="unused",
                          init_map=str(particles.parent / "ground_truth.mrc"),
                          initial_resolution_a=40.0, cache_dir=str(tmp_path / "cache"))
    search = refine.search_config()
    cached = full_spectra(prepare_run(search, progress=False))
    memory = full_spectra(prepare_run(dataclasses.replace(search, cache_dir=None),
                                      progress=False))
    assert isinstance(cached.coefficients, DiskRows)
    assert torch.equal(cached.coefficients[:], memory.coefficients)
    assert len(list((tmp_path / "cache").glob("spectra-*.npy"))) == 1


def test_the_model_layout_sets_the_cached_rows(particles, tmp_path):
    """A finer cutoff means larger blocks: another key, another file of the new shape."""
    cache = tmp_path / "cache"
    for max_freq in (0.2, 0.3):
        run = prepare_run(config(particles, cache, max_freq), progress=False)
        layout = make_model(run.config, run.geometry, run.geometry.cutoff_radius_px).images.layout
        assert run.particles.blocks.shape == (300, layout.centred_length, layout.half_length)
    assert len(cache_files(cache)) == 2


@pytest.mark.slow  # about 30 s here
@needs_torchrun
def test_two_processes_share_one_cache_built_by_rank_0(particles, tmp_path):
    cache = tmp_path / "cache"
    one = tmp_path / "one"
    assert main(reconstruct_args(particles, one)) == 0
    done = launch(2, *reconstruct_args(particles, tmp_path / "two", "--cache-dir", str(cache)))
    assert done.stderr.count("building the cache") == 1
    assert len(cache_files(cache)) == 1
    fsc = fsc_inside_cutoff(one, tmp_path / "two")  # as test_distributed's in-memory runs
    assert (fsc > 0.99).all(), fsc
