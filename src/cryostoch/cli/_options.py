"""Command-line options shared by the commands that read particles and build a map.

`reconstruct` and `baseline` take the same data, geometry and selection options, so that a
baseline and a stochastic run on the same files use the same particles, working box, cutoff,
held-out set and random start. Values are checked by the configs (one-line InputError), not
by argparse, so every bad value reads the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryostoch.errors import InputError


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(float(v)) for v in text.split(",") if v.strip())
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """How the particles are read and selected, where the work runs and where the preprocessed
    particles are kept: shared by `reconstruct`, `baseline`, `score` and `refine`."""
    parser.add_argument("--particle-diameter-a", type=float, default=None,
                        help="particle diameter (default 80%% of the box)")
    sign = parser.add_mutually_exclusive_group()
    sign.add_argument("--invert", dest="invert", action="store_true", default=None,
                      help="multiply the data by -1 (default: detect the contrast sign)")
    sign.add_argument("--no-invert", dest="invert", action="store_false",
                      help="use the data's sign as given")
    parser.add_argument("--project-root", default=None,
                        help="folder that relative image paths start from")
    parser.add_argument("--class-file", default=None,
                        help="RELION 2-D classification _data.star to select particles by class")
    parser.add_argument("--keep-classes", type=int_list, default=(),
                        help="class numbers to keep from --class-file, e.g. 1,4,7")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="keep the preprocessed particles in a file in DIR instead of in "
                             "memory (memory then stays bounded whatever the number of "
                             "particles); reused by later runs on the same particles and "
                             "settings")


def add_particle_options(parser: argparse.ArgumentParser, *, writes_map: bool = True) -> None:
    """Input, output, working box, cutoff, start, held-out set, selection and device; with
    `writes_map`, what the run folder's viewer script needs (--mass-kda)."""
    parser.add_argument("particles", help="RELION STAR or cryoSPARC .cs file of particles")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-freq", type=float, default=None,
                        help="likelihood cutoff as a fraction of Nyquist (default: see "
                             "--resolution-a)")
    parser.add_argument("--resolution-a", type=float, default=None,
                        help="likelihood cutoff in Angstrom (overrides --max-freq; default: a "
                             "fifth of the particle diameter, 36 A for a 180 A particle)")
    parser.add_argument("--box", type=int, default=None,
                        help="Fourier-crop the images to this working box first")
    parser.add_argument("--init", default="random", help="'random' (sum of spheres) or a map")
    parser.add_argument("--test-size", type=int, default=100, help="held-out test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift-range-a", type=float, default=None,
                        help="radius of the shift search in Angstrom (0: no shifts; default "
                             "8%% of the box, as auto-picked particles sit off-centre)")
    parser.add_argument("--shift-sigma-a", type=float, default=None,
                        help="sigma of the normal shift prior (default: half the range)")
    if writes_map:
        parser.add_argument("--mass-kda", type=float, default=None,
                            help="the molecule's mass in kDa, if known: open_in_chimerax.cxc "
                                 "then shows the surface that encloses its volume (1.21 A^3/Da)")
    add_data_options(parser)
    parser.add_argument("--half-set", type=int, default=None,
                        help="use only the odd (1) or even (2) particles, for half-map FSC")
    parser.add_argument("--noise-model", default="coloured",
                        help="coloured (default: a noise variance per frequency shell and optics "
                             "group, measured from the particles' background) or white (one "
                             "sigma, the paper's model)")
    parser.add_argument("--noise-update", action="store_true",
                        help="with coloured noise: re-estimate the noise spectrum from the "
                             "residuals under the pose posterior at every stage change "
                             "(RELION's sigma2_noise update)")
    parser.add_argument("--symmetry", default="C1",
                        help="point group in RELION's conventions (C1, Cn, Dn, T, O, I): imposed "
                             "on the map, with the orientation search restricted to one "
                             "asymmetric unit (default C1, as advised for ab initio)")
    parser.add_argument("--mask", default="auto",
                        help="solvent mask: auto (default: a sphere of the particle diameter, "
                             "then following the map at every stage), sphere, none, or an MRC "
                             "file")
    parser.add_argument("--mask-threshold", type=float, default=0.15,
                        help="with --mask auto: keep the map above this fraction of its maximum "
                             "(then grown 3 px with a 4 px soft edge; default 0.15)")


def particle_config_fields(args: argparse.Namespace) -> dict:
    """The `ReconstructionConfig` fields set by `add_particle_options`."""
    return dict(
        particles=args.particles, out_dir=args.out, max_freq=args.max_freq,
        resolution_a=args.resolution_a, box_size=args.box, init=args.init,
        test_size=args.test_size, seed=args.seed, device=args.device, dtype=args.dtype,
        shift_range_a=args.shift_range_a, shift_sigma_a=args.shift_sigma_a,
        particle_diameter_a=args.particle_diameter_a, invert=args.invert,
        project_root=args.project_root, class_file=args.class_file,
        keep_classes=tuple(args.keep_classes), half_set=args.half_set,
        noise_model=args.noise_model, mask=args.mask, symmetry=args.symmetry,
        noise_update=args.noise_update, mask_threshold=args.mask_threshold,
        mass_kda=getattr(args, "mass_kda", None), cache_dir=args.cache_dir,
    )


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """The optimiser and the objective's pipeline: shared by `reconstruct` and `tune-lr`, so
    that a rate tuned by one is used by the other on the same objective."""
    from cryostoch.engine.config import OPTIMIZER_NAMES

    parser.add_argument("--optimizer", default="sgd",
                        help=f"stochastic optimiser: {', '.join(OPTIMIZER_NAMES)} (default "
                             "sgd), or any torch.optim.Optimizer subclass as "
                             "package.module:Class (e.g. torch.optim:Adam), started at 2 / L "
                             "unless --lr")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="minibatch size (default 100; 300 for hf)")
    parser.add_argument("--lambda-plus", type=float, default=1e-4,
                        help="prior strength on positive density (sparsity)")
    parser.add_argument("--lambda-minus", type=float, default=1e-4,
                        help="prior strength on negative density")
    parser.add_argument("--start-temperature", type=float, default=1.0,
                        help="posterior temperature at the start, annealed to 1 over the first "
                             "half of the run (default 1: no tempering; 8 helps short runs)")
    parser.add_argument("--preconditioner", default="auto",
                        help="auto (default: the Fourier preconditioner for the first-order "
                             "methods, none for olbfgs and hf), fourier or none")
    parser.add_argument("--start-freq-fraction", type=float, default=0.4,
                        help="frequency marching: the first stage's cutoff as a fraction of "
                             "the final one (default 0.4; 1 switches marching off)")
    parser.add_argument("--marching-stages", type=int, default=4,
                        help="stages of frequency marching and tempering (default 4)")
    parser.add_argument("--paper-faithful", action="store_true",
                        help="the paper's plain method: no preconditioner, marching or "
                             "tempering, white noise, no mask (overrides those options)")


def method_config_fields(args: argparse.Namespace) -> dict:
    """The `ReconstructionConfig` fields set by `add_method_options` (--paper-faithful is
    applied to the config afterwards)."""
    return dict(optimizer=args.optimizer, batch_size=args.batch_size,
                lambda_plus=args.lambda_plus, lambda_minus=args.lambda_minus,
                start_temperature=args.start_temperature, preconditioner=args.preconditioner,
                start_freq_fraction=args.start_freq_fraction,
                marching_stages=args.marching_stages)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 can be faster "
                             "on a machine busy with other jobs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in the --out folder (without "
                             "it, such a folder is refused)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count from --threads (checked first: one-line error)."""
    if args.threads is None:
        return
    if args.threads < 1:
        raise InputError("--threads", f"must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def check_output_file(path: Path | None, option: str) -> None:
    """InputError (naming `option`) unless `path` can be a file to write: not an existing
    folder, and in a folder that exists. None (the option not given) passes."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(option, f"{str(path)!r} is a folder: give the file to write")
    if not path.parent.is_dir():
        raise InputError(option, f"folder {str(path.parent)!r} does not exist")
