"""The `cryostoch` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys

from cryostoch import __version__
from cryostoch.errors import InputError

# name -> module under cryostoch.cli; each module defines `add_arguments(parser)` and `run(args)`.
SUBCOMMANDS: dict[str, str] = {
    "info": "info",
    "reconstruct": "reconstruct",
    "fsc": "fsc",
    "simulate": "simulate",
    "random-init": "random_init",
    "baseline": "baseline",
    "demo": "demo",
    "experiment": "experiment",
    "symmetry": "symmetry",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryostoch",
        description="Ab initio cryo-EM reconstruction by stochastic optimisation.",
    )
    parser.add_argument("--version", action="version", version=f"cryostoch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"cryostoch.cli.{module_name}")
        doc = (module.__doc__ or "").strip().splitlines()
        sp = sub.add_parser(name, help=doc[0] if doc else None, description=module.__doc__)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args._run(args)
    except InputError as err:
        print(f"cryostoch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cryostoch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
