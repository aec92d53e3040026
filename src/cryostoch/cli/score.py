"""Score maps on held-out particles against their featureless spherical averages.

Prints, for each --map, the held-out negative log-likelihood per image (poses and shifts
marginalised, the same noise model and cutoff as `reconstruct`) at the map's best global
scale, the same for its spherical average (a blob with the map's radial profile), and the gain:
a right map beats its blob. With the seed and --test-size of a `reconstruct` run (and its
cutoff and shift options), the held-out particles are those that run never trained on.
Writes DIR/score.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cryostoch.cli._options import (
    add_particle_options,
    add_run_options,
    apply_threads,
    particle_config_fields,
)
from cryostoch.errors import InputError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_particle_options(parser, writes_map=False)
    parser.add_argument("--map", dest="maps", action="append", required=True, metavar="MRC",
                        help="map to score (repeat for several); it must span the particles' box")
    add_run_options(parser)


def run(args: argparse.Namespace) -> int:
    from cryostoch.engine.config import ReconstructionConfig
    from cryostoch.engine.score import score_maps, score_record
    from cryostoch.io._common import atomic_path

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config = ReconstructionConfig(**particle_config_fields(args))
    except ValueError as err:
        raise InputError("options", str(err)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out must be a folder")
    apply_threads(args)
    scores = score_maps(config, list(args.maps), progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "score.json") as tmp:
        tmp.write_text(json.dumps(score_record(config, scores), indent=2))
    print(f"{'map':<40} {'held-out NLL':>13} {'blob NLL':>10} {'gain':>8}")
    for s in scores:
        print(f"{s.path:<40} {s.nll:13.3f} {s.blob_nll:10.3f} {s.gain:8.3f}")
    print(f"per image on {config.test_size} held-out particles; gain > 0: the map's features "
          "explain the images better than a blob of its radial profile")
    print(f"wrote {out / 'score.json'}")
    return 0
