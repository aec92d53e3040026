"""The built-in demo: simulate a data set from the phantom, reconstruct it ab initio, compare.

Three steps a new user can read off the output folder:
1. `data/`: particles simulated from the built-in phantom (real CTF parameters drawn from the
   EMPIAR-10049 table when it is found beside the checkout, otherwise documented defaults),
   SNR 0.05, uniformly random orientations, no shifts (the paper's synthetic setting, smaller);
2. `reconstruction/`: `cryostoch reconstruct` from the paper's random initial density with the
   default optimiser;
3. `fsc.png`, `aligned_map.mrc`: the map aligned onto the ground truth (orientation and hand
   are arbitrary ab initio) and their Fourier shell correlation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.outputs import ReconstructionResult
from cryostoch.engine.reconstruct import reconstruct
from cryostoch.engine.reference_data import CTF_TABLE, reference_file
from cryostoch.evaluate.fsc import FscReport, fsc_report
from cryostoch.io.mrc import read_map
from cryostoch.simulate.run import SimulationConfig, SimulationResult, simulate_dataset


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "demo_out"
    n_particles: int = 5000
    box_size: int = 64
    pixel_size_a: float = 5.0
    snr: float = 0.05
    max_freq: float = 0.25
    epochs: float = 1.0
    seed: int = 0
    device: str = "cpu"
    ctf_table: str | None = None

    def __post_init__(self) -> None:
        if self.n_particles < 300:
            raise ValueError("the demo needs at least 300 particles")


@dataclass
class DemoResult:
    simulation: SimulationResult
    reconstruction: ReconstructionResult
    fsc: FscReport
    fsc_plot: Path
    aligned_map: Path


def run_demo(config: DemoConfig, *, progress: bool = True) -> DemoResult:
    out = Path(config.out_dir)
    table = config.ctf_table
    if table is None:
        found = reference_file(*CTF_TABLE)
        table = None if found is None else str(found)
    simulation = simulate_dataset(
        SimulationConfig(
            source="phantom",
            n_particles=config.n_particles,
            box_size=config.box_size,
            pixel_size_a=config.pixel_size_a,
            out_dir=str(out / "data"),
            ctf_table=table,
            snr=config.snr,
            seed=config.seed,
            overwrite=True,
        ),
        progress=progress,
    )
    result = reconstruct(
        ReconstructionConfig(
            particles=str(simulation.star_path),
            out_dir=str(out / "reconstruction"),
            max_freq=config.max_freq,
            epochs=config.epochs,
            shift_range_a=0.0,  # the simulated particles are centred
            # one epoch for speed: a run that short reaches the cutoff only with tempering
            start_temperature=8.0,
            seed=config.seed,
            device=config.device,
        ),
        overwrite=True,  # as the simulation above: a demo folder is redone, not resumed
        progress=progress,
    )
    truth, pixel = read_map(simulation.ground_truth_path)
    plot, aligned = out / "fsc.png", out / "aligned_map.mrc"
    report = fsc_report(
        truth,
        result.volume,
        pixel_size_a=pixel,
        align=True,
        plot_path=plot,
        aligned_path=aligned,
        name_a="ground truth",
        name_b="ab initio map",
        title="demo: ab initio map vs ground truth",
    )
    return DemoResult(simulation, result, report, plot, aligned)
