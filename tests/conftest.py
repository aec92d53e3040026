"""Shared test fixtures: the reference data in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# fixtures of the bad-input tests: `sim` (a tiny simulated set) and `finished` (a run of it)
from bad_input_support import finished, sim  # noqa: F401, E402, I001
from cryostoch.operators.ctf import CtfParameters


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker gets its share of the cores (torch here, OpenMP in the
    CLI subprocesses it starts): two workers of two threads each on two cores run slower
    than one."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Mark for tests that read SHARED_DATA: they are skipped cleanly where it is missing.
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"reference data not found at {SHARED_DATA}"
)


@pytest.fixture
def shared_data() -> Path:
    """The reference data folder; skips the test when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


def random_ctf(n: int, seed: int, *, defocus_a: tuple[float, float] = (8000.0, 16000.0),
               astigmatism_a: float = 500.0, amplitude_contrast: float = 0.1) -> CtfParameters:
    """n seeded astigmatic 300 kV CTFs: defocus U uniform in `defocus_a`, V up to
    `astigmatism_a` below it, astigmatism angle uniform in [0, 180) degrees."""
    g = torch.Generator().manual_seed(seed)
    low, high = defocus_a
    du = low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)
    return CtfParameters.from_values(
        n, defocus_u_a=du,
        defocus_v_a=du - astigmatism_a * torch.rand(n, generator=g, dtype=torch.float64),
        defocus_angle_deg=180 * torch.rand(n, generator=g, dtype=torch.float64),
        voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=amplitude_contrast)
