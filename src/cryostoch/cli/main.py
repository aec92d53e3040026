"""The `cryostoch` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import warnings

from cryostoch import __version__
from cryostoch.errors import InputError, SharedInputError

# OSErrors that are faults of the place written to, not of the program: one line, exit 2.
WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

# name -> module under cryostoch.cli; each module defines `add_arguments(parser)` and `run(args)`.
SUBCOMMANDS: dict[str, str] = {
    "info": "info",
    "reconstruct": "reconstruct",
    "fsc": "fsc",
    "postprocess": "postprocess",
    "simulate": "simulate",
    "random-init": "random_init",
    "baseline": "baseline",
    "demo": "demo",
    "experiment": "experiment",
    "symmetry": "symmetry",
    "score": "score",
    "refine": "refine",
    "flip-hand": "flip_hand",
    "align": "align",
    "tune-lr": "tune_lr",
    "pose-error": "pose_error",
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


def quiet_unless_main(rank: int) -> None:
    """Under torchrun, ranks other than 0 print no results, logs or progress: rank 0 speaks
    for the run (warnings and errors of their own still show)."""
    if rank == 0:
        return
    import logging

    logging.disable(logging.INFO)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; 0 without it
    quiet_unless_main(rank)
    try:
        with warnings.catch_warnings(record=True) as caught:
            result = args._run(args)
    except SharedInputError:  # rank 0 met it and prints it
        return 2
    except InputError as err:  # the error alone: warnings on the way to it only distract
        where = f" (rank {rank})" if rank else ""
        print(f"cryostoch: error{where}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_FAULTS:
            raise
        # disk full, read-only or forbidden: where and what, without a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"cryostoch: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cryostoch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    for warning in caught:  # shown once the command has succeeded
        warnings.showwarning(warning.message, warning.category, warning.filename,
                             warning.lineno)
    return int(result or 0)


def leave(code: int) -> None:
    """End the process with `code`. Under torchrun (several processes) skip the interpreter's
    and C++ runtime's teardown once everything is flushed: the process group is already
    destroyed and every file closed, but gloo's threads could still abort a rank at static
    destruction ("terminate called without an active exception"), which torchrun reports as
    a failed run after a complete one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def entry() -> None:
    """The `cryostoch` console script."""
    leave(main())


if __name__ == "__main__":
    entry()
