"""cryostoch's rows of the peer table: `cryostoch reconstruct` with the defaults chosen from
the data, and the same with `--refine` (ab initio, then gold-standard refinement).

    python benchmarks/peers/cryostoch_peer.py --work /work/peers_work [--threads 1]

Each row is timed as one whole command (preprocessing, optimisation, outputs), then its map is
aligned onto the truth (rotation, shift, hand) for the FSC. Results in WORK/cryostoch*/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common

ROWS = {  # folder: (label, extra options)
    "cryostoch": ("cryostoch reconstruct (defaults)", []),
    "cryostoch_refine": ("cryostoch reconstruct --refine", ["--refine"]),
}


def run_row(work: Path, name: str, star: Path, threads: int) -> dict:
    label, extra = ROWS[name]
    folder = work / name
    out = folder / "run"
    options = ["--threads", str(threads), "--quiet", "--overwrite", *extra]
    command = common.cryostoch_command("reconstruct", str(star), "--out", str(out), *options)
    seconds = common.run_timed(command, folder / "run.log", env=common.cryostoch_env())
    # --refine leaves the ab initio map in out/ and the refined one in out/refine/
    final_map = out / "refine" / "map.mrc" if "--refine" in extra else out / "map.mrc"
    result = {"method": label, "wall_s": round(seconds, 1),
              "settings": "reconstruct " + " ".join(["PARTICLES", *options]),
              "command": " ".join(command)}
    result.update(common.aligned_fsc(final_map, work / "data" / "ground_truth.mrc",
                                     folder / "aligned.mrc"))
    result["details"] = _details(out, "--refine" in extra)
    common.save_result(folder, result)
    return result


def _details(out: Path, refined: bool) -> str:
    """What the defaults chose (diameter, cutoff, shifts), from the run's own records."""
    import json

    config = json.loads((out / "config.json").read_text())
    parts = [str(choice).split(" (")[0] for choice in config.get("chosen_from_data", [])]
    if refined and (out / "refine" / "refine.json").is_file():
        refine = json.loads((out / "refine" / "refine.json").read_text())
        parts.append(f"refine: {refine['iterations']} iterations, gold-standard FSC 0.143 "
                     f"{refine['resolution_0143_a']:.1f} A")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--n-particles", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args(argv)
    star = common.simulate_set(args.work, args.n_particles)
    for name in args.rows.split(","):
        print(run_row(args.work, name, star, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
