"""Shared test fixtures: the reference data in ../shared/data (never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
