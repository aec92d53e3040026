"""Peers side by side: cryostoch, RELION 3.1 and cryoDRGN on one simulated set, one table.

    PYTHONPATH=src python benchmarks/peers/run.py --work /work/peers_work

Simulates the set once (common.simulate_set), runs each peer in turn (cryostoch_peer.py,
relion_peer.py, cryodrgn_peer.py, cryodrgn_ai_peer.py; each also runnable alone), aligns every
map onto the truth for its FSC and writes benchmarks/peers.md. A peer whose result.json is
already in WORK is not run again unless --rerun names it, so a table can be finished after an
interruption; a peer that fails or cannot be installed gets a row saying so, and the others
still run.
"""

from __future__ import annotations

import argparse
import platform
import time
import traceback
from pathlib import Path

import common
import cryodrgn_ai_peer
import cryodrgn_peer
import cryostoch_peer
import relion_peer

PEERS = ("cryostoch", "cryostoch_refine", "relion", "cryodrgn", "cryodrgn_ai")


def run_peer(name: str, args: argparse.Namespace, star: Path) -> dict:
    if name in cryostoch_peer.ROWS:
        return cryostoch_peer.run_row(args.work, name, star, args.threads)
    if name == "relion":
        return relion_peer.run(args.work, star, args.relion_iterations, args.threads)
    if name == "cryodrgn_ai":
        return cryodrgn_ai_peer.run(args.work, star, args.cryodrgn_ai_epochs, args.threads,
                                    args.cryodrgn_images)
    return cryodrgn_peer.run(args.work, star, args.cryodrgn_epochs,
                             args.cryodrgn_pretrain_images, args.threads, args.cryodrgn_images)


def run_all(args: argparse.Namespace) -> list[dict]:
    star = common.simulate_set(args.work, args.n_particles)
    rerun = set(filter(None, args.rerun.split(",")))
    results = []
    for name in args.peers.split(","):
        folder = args.work / name
        result = None if name in rerun else common.load_result(folder)
        if result is None:
            print(f"== {name}", flush=True)
            try:
                result = run_peer(name, args, star)
            except Exception as err:  # noqa: BLE001 - one peer failing must not stop the table
                traceback.print_exc()
                result = {"method": name, "status": f"failed: {str(err).splitlines()[0]}"}
                common.save_result(folder, result)
        else:
            print(f"== {name}: reusing {folder / 'result.json'}")
        results.append(result)
    return results


def _resolution(value: float | None, nyquist_a: float | None) -> str:
    if value is None:
        return f"Nyquist ({nyquist_a:g} A)" if nyquist_a else "-"
    first_shell_a = common.BOX_PX * common.PIXEL_SIZE_A
    if value > first_shell_a:  # interpolated between the mean (taken as 1) and shell 1
        return f"below at the first shell ({first_shell_a:g} A)"
    return f"{value:.1f}"


def table_markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Peers side by side",
        "",
        f"Written by `benchmarks/peers/run.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.node() or 'this machine'}: {_cpu_line()}). "
        f"The set: {args.n_particles} particles simulated by `cryostoch simulate` from "
        "`structures/6vyb.pdb` (SARS-CoV-2 spike), box 64 at 5 A/px (Nyquist 10 A), real "
        "EMPIAR-10049 CTFs, SNR 0.05, coloured noise with the beta-galactosidase particles' "
        "background spectrum, shifts of sigma 5 A. Every map is aligned onto the truth "
        "(rotation, shift and hand, `cryostoch align`'s aligner) before its FSC.",
        "",
        *([args.note, ""] if args.note else []),
        "| method | wall time (s) | FSC 0.5 vs truth (A) | FSC 0.143 vs truth (A) | hand "
        "| settings |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "status" in r:
            lines.append(f"| {r['method']} | - | - | - | - | {r['status']} |")
            continue
        settings = r["settings"] + (f"; {r['details']}" if r.get("details") else "")
        lines.append(
            f"| {r['method']} | {r['wall_s']:.0f} | {_resolution(r['fsc05_a'], r['nyquist_a'])}"
            f" | {_resolution(r['fsc0143_a'], r['nyquist_a'])} | "
            f"{'mirrored' if r['mirrored'] else 'as is'} | {settings.replace('|', '/')} |")
    lines += ["", "Wall time: the whole command (for cryostoch with its preprocessing and outputs; "
              "for RELION and cryoDRGN without the float32 copy and ctf.pkl, which take "
              "seconds). 'Nyquist' in an FSC column: the curve never falls below the "
              "threshold. Hand: whether the map had to be mirrored onto the truth (ab initio "
              "maps come in either hand).", "", "Commands:", ""]
    lines += [f"- {r['method']}: `{r['command']}`" for r in results if "command" in r]
    return "\n".join(lines) + "\n"


def _cpu_line() -> str:
    import os

    return f"{os.cpu_count()} CPU cores, no GPU, shared with other jobs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="simulated set and runs")
    parser.add_argument("--table", type=Path, default=common.REPO / "benchmarks" / "peers.md")
    parser.add_argument("--n-particles", type=int, default=3000)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--rerun", default="", help="peers to run again although finished")
    parser.add_argument("--note", default="", help="a paragraph for the table's page (e.g. "
                        "what else ran on the machine meanwhile)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for every peer")
    parser.add_argument("--relion-iterations", type=relion_peer.parse_iterations,
                        default=relion_peer.DEFAULT_ITERATIONS)
    parser.add_argument("--cryodrgn-epochs", type=int, default=cryodrgn_peer.DEFAULT_EPOCHS)
    parser.add_argument("--cryodrgn-pretrain-images", type=int,
                        default=cryodrgn_peer.DEFAULT_PRETRAIN_IMAGES)
    parser.add_argument("--cryodrgn-ai-epochs", type=int,
                        default=cryodrgn_ai_peer.DEFAULT_EPOCHS)
    parser.add_argument("--cryodrgn-images", type=int, default=cryodrgn_peer.DEFAULT_N_IMAGES,
                        help="cryoDRGN trains on the first N images (CPU time)")
    args = parser.parse_args(argv)
    results = run_all(args)
    args.table.write_text(table_markdown(results, args))
    print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
