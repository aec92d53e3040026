"""Atomic checkpoints: written to a temporary file in the same folder, then renamed."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from cryostoch.errors import InputError
from cryostoch.io._common import default_file_mode


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# What every checkpoint holds (see `Reconstruction._checkpoint`).
CHECKPOINT_KEYS = ("config", "volume", "optimizer", "run")


def load_checkpoint(path: Path, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict[str, Any]:
    """The state saved by `save_checkpoint`; InputError (one line) if the file is damaged.

    Loaded with `weights_only=True`: a checkpoint holds only tensors, numbers, strings and
    containers of them, and torch's restricted unpickler then refuses anything else instead
    of running the code a pickle can carry.
    """
    if not path.is_file():
        raise InputError(path, "is not a checkpoint file (remove it, or use --overwrite)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" not in str(err).lower():  # random bytes: an invalid pickle
            raise InputError(path, "is damaged (not a torch file); remove it to start again, "
                             "or use --overwrite") from None
        # the restricted unpickler met something else than tensors, numbers and containers
        raise InputError(path, "holds objects other than tensors and numbers, so it is not a "
                         "cryostoch checkpoint and is not loaded (that could run code); remove "
                         "it, or use --overwrite") from None
    except Exception:  # noqa: BLE001 - truncated, empty or random files fail in many ways
        raise InputError(path, "is damaged (truncated, empty or not a torch file); remove it "
                         "to start again, or use --overwrite") from None
    if not isinstance(state, dict) or not all(key in state for key in keys):
        raise InputError(path, "not a cryostoch checkpoint (it lacks the run state); remove it "
                         "to start again, or use --overwrite")
    return state
