"""Simulate a particle data set from a density, like the paper's synthetic data.

SOURCE is 'phantom' (a built-in asymmetric molecule about 195 A long), an MRC map (rescaled to
the pixel size and box by Fourier crop/pad) or a PDB/mmCIF model (electron-scattering density
by gemmi, centred on its centre of mass). Each image is the density's projection at a
Haar-uniform random rotation, times a CTF (rows of --ctf-table drawn with replacement, or
300 kV, Cs 2.7 mm, Q0 0.1, defocus uniform 1-3 um), shifted (--shift-sigma-a), plus white
Gaussian noise of sigma 1, by the same forward model the likelihood uses. SNR = mean over
images of the variance of the noise-free image over the whole box, divided by the noise
variance; the density is scaled to reach it (measured on the first --pilot-size particles).

Real-data hazards (all off by default): coloured noise (--noise-spectrum, or --noise-from to
copy the background power spectrum of real particles; the mean noise variance stays 1), junk
(--junk-fraction: ice blobs, empty images and off-centre neighbours in equal shares, whose
STAR rows look like good particles; the truth is in the column rlnCryostochJunk: 0 good,
1 ice, 2 empty, 3 neighbour) and per-particle contrast (--contrast-sigma: signal times
exp(S z), recorded as rlnCryostochScale).

Writes DIR/particles.mrcs, DIR/particles.star (RELION 3.1, CTFs and ground-truth poses),
DIR/ground_truth.mrc (the scaled density), DIR/montage.png and DIR/simulation.json.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cryostoch.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--volume", required=True, metavar="SOURCE",
                        help="'phantom', an MRC map (.mrc/.map) or an atomic model (.pdb/.cif)")
    parser.add_argument("--n-particles", type=int, required=True, metavar="N",
                        help="number of particle images")
    parser.add_argument("--box", type=int, required=True, metavar="B",
                        help="image size in pixels (even)")
    parser.add_argument("--pixel-size-a", type=float, required=True, metavar="P",
                        help="pixel size in Angstrom")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--ctf-table", default=None, metavar="STAR_OR_CS",
                        help="draw CTF parameter sets (rows, with replacement) and optics from "
                        "this RELION STAR or cryoSPARC .cs file (default: 300 kV, Cs 2.7 mm, "
                        "Q0 0.1, defocus uniform 1-3 um)")
    parser.add_argument("--snr", type=float, default=0.05,
                        help="signal-to-noise ratio: mean variance of the noise-free images "
                        "over the whole box / noise variance (default 0.05, the paper's)")
    parser.add_argument("--shift-sigma-a", type=float, default=0.0, metavar="S",
                        help="standard deviation of the in-plane shifts in Angstrom, truncated "
                        "to a disc of 3 S (default 0: centred particles, like the paper)")
    parser.add_argument("--noise-spectrum", default=None, metavar="FILE",
                        help="coloured noise: a two-column text/CSV file (frequency in 1/A, "
                        "relative noise power; '#' comments and a header line allowed), "
                        "interpolated onto the images' radial frequencies (constant beyond "
                        "its ends) and normalised so that the mean noise variance stays 1 "
                        "(default: white noise)")
    parser.add_argument("--noise-from", default=None, metavar="PARTICLES",
                        help="coloured noise with the background power spectrum of real "
                        "particles (a STAR/.cs/.mrcs file; 500 evenly spaced images, outside "
                        "the particle diameter), resampled onto the images' frequencies")
    parser.add_argument("--noise-particle-diameter-a", type=float, default=None, metavar="D",
                        help="particle diameter in A of the --noise-from particles: their "
                        "background lies outside it (default 80%% of their box)")
    parser.add_argument("--junk-fraction", type=float, default=0.0, metavar="F",
                        help="share of junk images in [0, 1): ice/contaminant blobs, empty "
                        "(noise-only) images and off-centre neighbours (the molecule shifted "
                        "by 0.35-0.5 of the box) in equal shares (default 0)")
    parser.add_argument("--contrast-sigma", type=float, default=0.0, metavar="S",
                        help="per-particle contrast: signal times exp(S z), z standard normal "
                        "(default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                        help="image data type in the stack (default float32)")
    parser.add_argument("--chunk-size", type=int, default=64, metavar="K",
                        help="images generated and written at a time (bounds memory; the "
                        "output does not depend on it, to rounding; default 64)")
    parser.add_argument("--pilot-size", type=int, default=1000, metavar="K",
                        help="particles whose noise-free images set the density scale for the "
                        "SNR (default 1000)")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "float64"],
                        help="precision of the forward model (default float32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="CPU threads for torch (default: torch's choice; 1 is often "
                        "faster on a machine busy with other work)")
    parser.add_argument("--montage", type=int, default=6, metavar="K",
                        help="particles shown in montage.png (0: none; default 6)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier simulation in DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cryostoch.simulate.run import SimulationConfig, simulate_dataset

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config = SimulationConfig(
            source=args.volume, n_particles=args.n_particles, box_size=args.box,
            pixel_size_a=args.pixel_size_a, out_dir=args.out, ctf_table=args.ctf_table,
            snr=args.snr, shift_sigma_a=args.shift_sigma_a, seed=args.seed, dtype=args.dtype,
            chunk_size=args.chunk_size, pilot_size=args.pilot_size,
            compute_dtype=args.compute_dtype, device=args.device, n_montage=args.montage,
            overwrite=args.overwrite, noise_spectrum=args.noise_spectrum,
            noise_from=args.noise_from,
            noise_particle_diameter_a=args.noise_particle_diameter_a,
            junk_fraction=args.junk_fraction, contrast_sigma=args.contrast_sigma,
        )
    except (TypeError, ValueError) as err:
        raise InputError("options", str(err)) from None
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("--threads", f"must be a positive integer, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    result = simulate_dataset(config, progress=False if args.quiet else None)
    print(f"{result.n_particles:,} particles in {result.seconds:.1f} s; realised SNR "
          f"{result.realised_snr:.4g} (requested {config.snr:g})")
    print(f"outputs in {result.out_dir}: particles.star, particles.mrcs, ground_truth.mrc, "
          f"{'montage.png, ' if result.montage_path else ''}simulation.json")
    return 0
