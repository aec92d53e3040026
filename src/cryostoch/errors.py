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
