"""User-facing errors: one clear line naming the file (or option) and the problem."""

from __future__ import annotations

from os import PathLike


class InputError(Exception):
    """Bad user input: a file that cannot be used or a parameter that is impossible.

    `source` names the file or option at fault; `problem` says what is wrong, in one line.
    """

    def __init__(self, source: str | PathLike[str], problem: str):
        self.source = str(source)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.source}: {self.problem}")


class DivergedError(InputError):
    """A run whose objective, held-out NLL or map became non-finite: its step was too large."""


class SharedInputError(InputError):
    """An InputError that rank 0 of a data parallel run met and handed to the other ranks:
    rank 0 prints it, the others stay quiet (`engine/distributed.py`)."""
