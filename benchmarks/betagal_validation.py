"""Check a beta-galactosidase map the way a careful user would, without an atomic model.

    python benchmarks/betagal_validation.py RUN/map.mrc --out docs/betagal/validation \
        [--half-maps A/map.mrc B/map.mrc]

Prints and writes (validation.json, classes_vs_projections.png):
- the map's extents along its principal axes at the threshold that encloses the volume of
  465 kDa of protein (beta-galactosidase is about 180 x 130 x 90 A);
- for RELION's clean 2-D classes of the same particles (Class2D/job010), the normalised
  cross-correlation of each class average with the best-matching projection of the map
  (either hand), beside the same score for the map's own spherical average (the same radial
  profile without features) computed in the same run;
- with --half-maps, the FSC between two independent half-set maps after alignment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import starfile
import torch

from cryostoch.evaluate.class_averages import class_averages, match_projections
from cryostoch.evaluate.shape import (
    A3_PER_DALTON,
    enclosing_threshold,
    principal_extents,
    spherical_average,
)
from cryostoch.io.dataset import open_particles
from cryostoch.io.mrc import read_map

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "betagal_empiar10204"
PARTICLES = DATA / "Extract" / "job009" / "particles.star"
CLASSES = DATA / "Class2D" / "job010" / "run_it025_data.star"
CLEAN_CLASSES = [26, 28, 50, 38, 47, 22, 20]  # clean beta-galactosidase views (issue 11)
MASS_DA = 465_000


def averages_of_clean_classes():
    dataset = open_particles(PARTICLES)
    table = starfile.read(CLASSES, always_dict=True)["particles"]
    row_of = {name: i for i, name in enumerate(dataset.metadata["rlnImageName"])}
    table = table[table["rlnClassNumber"].isin(CLEAN_CLASSES)]
    rows = np.array([row_of[name] for name in table["rlnImageName"]])
    pixel = dataset.pixel_size_a
    origin = torch.tensor(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()) / pixel
    return class_averages(dataset.read_images(rows), dataset.ctf.index(torch.as_tensor(rows)),
                          pixel, torch.tensor(table["rlnAnglePsi"].to_numpy()), origin,
                          torch.tensor(table["rlnClassNumber"].to_numpy()), CLEAN_CLASSES)


def figure(path: Path, averages, match) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = averages.averages.shape[0]
    fig, axes = plt.subplots(2, k, figsize=(2 * k, 4.4))
    for i in range(k):
        axes[0, i].imshow(averages.averages[i].numpy(), cmap="gray", origin="lower")
        axes[0, i].set_title(f"class {averages.class_numbers[i]} ({int(averages.counts[i])})",
                             fontsize=8)
        axes[1, i].imshow(match.projections[i].numpy(), cmap="gray", origin="lower")
        axes[1, i].set_title(f"cc {float(match.correlation[i]):.2f}", fontsize=8)
        for row in (0, 1):
            axes[row, i].axis("off")
    axes[0, 0].text(-0.3, 0.5, "RELION 2-D\nclass average", transform=axes[0, 0].transAxes,
                    ha="right", va="center", fontsize=9)
    axes[1, 0].text(-0.3, 0.5, "best projection\nof the map", transform=axes[1, 0].transAxes,
                    ha="right", va="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("map")
    parser.add_argument("--out", required=True)
    parser.add_argument("--half-maps", nargs=2, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    volume, pixel = read_map(args.map)
    volume = volume.double()
    threshold = enclosing_threshold(volume, MASS_DA * A3_PER_DALTON, pixel)
    extents = principal_extents(volume, threshold, pixel)
    averages = averages_of_clean_classes()
    match = match_projections(volume, averages)
    control = match_projections(spherical_average(volume), averages)
    report = {
        "map": str(args.map),
        "extents_a": [round(v, 1) for v in extents.lengths_a],
        "expected_extents_a": [180, 130, 90],
        "class_projection_cc": {str(c): round(float(v), 3) for c, v in
                                zip(averages.class_numbers, match.correlation, strict=True)},
        "mean_cc": round(float(match.correlation.mean()), 3),
        "mean_cc_spherical_average": round(float(control.correlation.mean()), 3),
    }
    if args.half_maps:
        from cryostoch.evaluate.fsc import fsc_report

        a, _ = read_map(args.half_maps[0])
        b, _ = read_map(args.half_maps[1])
        fsc = fsc_report(a, b, pixel_size_a=pixel, align=True)
        report["half_map_fsc_0.5_a"] = round(fsc.fsc.resolution_at(0.5), 1)
        report["half_map_fsc_0.143_a"] = round(fsc.fsc.resolution_at(0.143), 1)
    figure(out / "classes_vs_projections.png", averages, match)
    (out / "validation.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
