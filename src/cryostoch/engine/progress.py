"""Progress bars for long loops (tqdm), off when a run is quiet."""

from __future__ import annotations


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0, unit: str = "img"):
    """A tqdm bar, or None when `enabled` is false."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
                smoothing=0.1)
