"""Where the project's reference data (`shared/data`, beside a checkout) is found.

The demo and the paper's study draw real CTFs and real particles from it when it is there.
Searched in order: $CRYOSTOCH_REFERENCE_DATA, `../shared/data` from the working directory (the
README's commands run in the checkout), and `../shared/data` from the checkout this module was
installed from (an editable install run from elsewhere).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VARIABLE = "CRYOSTOCH_REFERENCE_DATA"
CTF_TABLE = ("ctf", "empiar10049_ctf.star")
BETAGAL_PARTICLES = ("betagal_empiar10204", "Extract", "job009", "particles.star")


def reference_file(*parts: str) -> Path | None:
    """The first existing `<reference data>/<parts>`, or None where there is none."""
    roots = []
    if os.environ.get(ENV_VARIABLE):
        roots.append(Path(os.environ[ENV_VARIABLE]))
    roots.append(Path.cwd().parent / "shared" / "data")
    roots.append(Path(__file__).resolve().parents[3].parent / "shared" / "data")
    for root in roots:
        path = root.joinpath(*parts)
        if path.is_file():
            return path
    return None
