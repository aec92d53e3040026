"""Configuration of a reconstruction run: a frozen, validated dataclass saved with every run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from cryostoch.geometry.symmetry import point_group
from cryostoch.optim.external import is_import_path, load_optimizer_class

OPTIMIZER_NAMES = ("sgd", "momentum", "nesterov", "adagrad", "tonga", "olbfgs", "hf", "adam")

# coloured: a radially symmetric noise variance per optics group, measured from the data
# (RELION's sigma2_noise, cryoSPARC's "symmetric" model); white: one sigma (the paper's model).
NOISE_MODELS = ("coloured", "white")
# auto: a sphere of the particle diameter, then a mask that follows the map at every stage;
# sphere: the sphere only; none: no mask; anything else: an MRC file with a soft mask.
MASK_KINDS = ("auto", "sphere", "none")

# The paper's minibatch sizes: 100 for every method except Hessian-free (300).
DEFAULT_BATCH_SIZE = {"hf": 300}

# Defaults chosen from the data when an option is left out (measured on the real
# beta-galactosidase particles and simulated hazards; README, "Defaults chosen from the data").
# Particle diameter: pickers box a particle with a margin, so 80% of the box.
DEFAULT_DIAMETER_BOX_FRACTION = 0.8
# Cutoff: a fifth of the particle diameter (36 A for a 180 A particle). The exhaustive search
# costs as the fifth power of diameter / resolution, so this fixes the cost per image for any
# particle size (about 6 Fourier pixels of a box 1.25x the particle).
DEFAULT_CUTOFF_PER_DIAMETER = 1 / 5
# Shifts: auto-picked particles sit off-centre by up to ~8% of the box (beta-galactosidase:
# 90% within 16.9 A of RELION's 2-D alignment in a 226 A box, the largest 31 A).
DEFAULT_SHIFT_BOX_FRACTION = 0.08
# Length: at least this many minibatch steps (and one epoch), so that small data sets get as
# many updates as large ones need. Measured on beta-galactosidase (2,274 training particles):
# 68 steps left the map thick, 137 came closest to its dimensions, 273 let it grow thick again.
DEFAULT_MIN_STEPS = 150


def device_problem(device: str) -> str | None:
    """Why `device` is not a torch device this run can use, or None."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"device {device!r} is not a device: use cpu, cuda or cuda:N"
    if parsed.type not in ("cpu", "cuda"):
        return f"device {device!r} is not supported: use cpu, cuda or cuda:N"
    return None


@dataclass(frozen=True)
class ReconstructionConfig:
    """Everything that determines a reconstruction (and so its checkpoint compatibility).

    Resolution: `max_freq` is the likelihood cutoff as a fraction of Nyquist of the *working*
    box; `resolution_a`, if given, overrides it; with neither, the cutoff is a fixed fraction
    of the particle diameter. `box_size` (optional) Fourier-crops the images to a smaller
    working box first. Shifts: `shift_range_a` is the radius of the shift disc (0: no shift
    marginalisation; None: a fraction of the box), `shift_sigma_a` the prior's sigma. `epochs`
    None: one epoch and at least DEFAULT_MIN_STEPS minibatch steps.
    """

    particles: str
    out_dir: str
    optimizer: str = "sgd"
    epochs: float | None = None  # None: one epoch and at least DEFAULT_MIN_STEPS steps
    max_freq: float | None = None  # None (and no resolution_a): from the particle diameter
    resolution_a: float | None = None
    box_size: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lambda_plus: float = 1e-4
    lambda_minus: float = 1e-4
    prior_beta: float = 1.0
    init: str = "random"
    test_size: int = 100
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    snapshots: tuple[int, ...] = ()
    shift_range_a: float | None = None  # None: DEFAULT_SHIFT_BOX_FRACTION of the box
    shift_sigma_a: float | None = None
    particle_diameter_a: float | None = None
    invert: bool | None = None
    project_root: str | None = None
    class_file: str | None = None
    keep_classes: tuple[int, ...] = ()
    half_set: int | None = None
    test_every: int = 20
    checkpoint_interval_s: float = 300.0
    volume_oversampling: int = 2
    image_oversampling: int = 2
    memory_budget_mb: float = 256.0
    write_poses: bool = True
    preconditioner: str = "auto"
    start_freq_fraction: float = 0.4
    marching_fraction: float = 0.5
    marching_stages: int = 4
    # 1: no tempering. With the default length (>= 150 steps) tempering from 8 gave the same
    # simulated maps and worse D2 fits of the real beta-galactosidase maps (README).
    start_temperature: float = 1.0
    gradient_budget: int | None = None
    noise_model: str = "coloured"
    noise_update: bool = False
    mask: str = "auto"
    # the map-following mask keeps what is above this fraction of the map's maximum (README:
    # 0.3 gave beta-galactosidase's dimensions but a worse held-out NLL)
    mask_threshold: float = 0.15
    classes: int = 1
    symmetry: str = "C1"
    # the molecule's mass, if known: only sets the surface level of open_in_chimerax.cxc
    mass_kda: float | None = None
    optimizer_options: dict = field(default_factory=dict)
    # preprocessed particles in a file here (reused across runs) instead of in memory
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        problems = [f"{name.replace('_', '-')} must be a finite number, got {value}"
                    for name, value in self._float_fields() if not math.isfinite(value)]
        if (device := device_problem(self.device)) is not None:
            problems.append(device)
        if is_import_path(self.optimizer):
            try:
                load_optimizer_class(self.optimizer)
            except ValueError as err:
                problems.append(str(err))
        elif self.optimizer not in OPTIMIZER_NAMES:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)} or a "
                            "torch.optim.Optimizer subclass as package.module:Class")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            problems.append("epochs must be positive")
        if self.max_freq is not None and not 0 < self.max_freq <= 0.9:
            problems.append("max-freq must be in (0, 0.9] (a fraction of Nyquist)")
        if self.resolution_a is not None and not self.resolution_a > 0:
            problems.append("resolution-a must be positive")
        if self.box_size is not None and (self.box_size < 16 or self.box_size % 2):
            problems.append("box must be an even number >= 16")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append("batch-size must be >= 1")
        if self.lr is not None and not self.lr > 0:
            problems.append("lr must be positive")
        if self.lambda_plus < 0 or self.lambda_minus < 0:
            problems.append("lambda-plus and lambda-minus must be >= 0")
        if self.prior_beta < 1:
            problems.append("prior beta must be >= 1")
        if self.test_size < 0:
            problems.append("test-size must be >= 0")
        if self.seed < 0:  # as simulate and random-init
            problems.append("seed must be >= 0")
        if self.dtype not in ("float32", "float64"):
            problems.append("dtype must be float32 or float64")
        if any(s <= 0 for s in self.snapshots):
            problems.append("snapshots must be positive gradient-evaluation counts")
        if self.shift_range_a is not None and self.shift_range_a < 0:
            problems.append("shift-range-a must be >= 0")
        if self.shift_sigma_a is not None and not self.shift_sigma_a > 0:
            problems.append("shift-sigma-a must be positive")
        if self.particle_diameter_a is not None and not self.particle_diameter_a > 0:
            problems.append("particle-diameter-a must be positive")
        if self.mass_kda is not None and not self.mass_kda > 0:
            problems.append("mass-kda must be positive")
        if bool(self.class_file) != bool(self.keep_classes):
            problems.append("class-file and keep-classes go together (the classification "
                            "STAR and the class numbers to keep)")
        if self.half_set not in (None, 1, 2):
            problems.append("half-set must be 1 or 2")
        if self.test_every < 1:
            problems.append("test-every must be >= 1")
        if self.checkpoint_interval_s < 0:
            problems.append("checkpoint interval must be >= 0")
        if not 0 < self.start_freq_fraction <= 1:
            problems.append("start-freq-fraction must be in (0, 1] (1 = no frequency marching)")
        if not 0 <= self.marching_fraction < 1:
            problems.append("marching-fraction must be in [0, 1)")
        if self.gradient_budget is not None and self.gradient_budget < 1:
            problems.append("gradient budget must be >= 1")
        if not self.start_temperature >= 1:
            problems.append("start-temperature must be >= 1")
        if self.marching_stages < 1:
            problems.append("marching-stages must be >= 1")
        if self.preconditioner not in ("auto", "fourier", "none"):
            problems.append("preconditioner must be auto, fourier or none")
        if self.noise_model not in NOISE_MODELS:
            problems.append(f"noise-model must be one of {', '.join(NOISE_MODELS)}")
        if not 1 <= self.classes <= 50:
            problems.append("classes must be between 1 and 50")
        try:
            point_group(self.symmetry)
        except ValueError as err:
            problems.append(f"symmetry: {err}")
        if not self.mask:
            problems.append("mask must be auto, sphere, none or an MRC file")
        if not 0 < self.mask_threshold < 1:
            problems.append("mask-threshold must be in (0, 1) (a fraction of the map's maximum)")
        if problems:
            raise ValueError("; ".join(problems))

    def _float_fields(self) -> list[tuple[str, float]]:
        """(name, value) of every number-valued field that is set: NaN and inf pass the
        range checks below (every comparison with NaN is false), so they are refused here."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), float | int)
                and not isinstance(getattr(self, f.name), bool)]

    def shift_sigma_px(self, shift_range_a: float, pixel_size_a: float) -> float:
        """Sigma of the shift prior in pixels: `shift_sigma_a`, or half the range (at least
        one pixel)."""
        return (self.shift_sigma_a or max(shift_range_a / 2, pixel_size_a)) / pixel_size_a

    @property
    def cutoff_option(self) -> str:
        """The option that set the cutoff (errors name it): --max-freq only when it did."""
        return "--max-freq" if self.max_freq is not None and self.resolution_a is None \
            else "--resolution-a"

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size or DEFAULT_BATCH_SIZE.get(self.optimizer, 100)

    @property
    def uses_fourier_preconditioner(self) -> bool:
        """auto: on for the first-order methods; off for online L-BFGS and Hessian-free, which
        build their own curvature model from gradient differences."""
        if self.preconditioner == "auto":
            return self.optimizer not in ("olbfgs", "hf")
        return self.preconditioner == "fourier"

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["snapshots"] = list(self.snapshots)
        d["keep_classes"] = list(self.keep_classes)
        return d

    @staticmethod
    def from_dict(d: dict) -> ReconstructionConfig:
        d = dict(d)
        d["snapshots"] = tuple(d.get("snapshots", ()))
        d["keep_classes"] = tuple(d.get("keep_classes", ()))
        return ReconstructionConfig(**d)

    def paper_faithful(self) -> ReconstructionConfig:
        """The paper's plain method: no preconditioner, no frequency marching, no tempering,
        white noise, no solvent mask."""
        return dataclasses.replace(self, preconditioner="none", start_freq_fraction=1.0,
                                   start_temperature=1.0, noise_model="white", mask="none")

    def trajectory_fields(self) -> dict:
        """The fields that must match for a checkpoint to resume this run exactly."""
        d = self.to_dict()
        for free in ("epochs", "gradient_budget", "out_dir", "device", "checkpoint_interval_s",
                     "write_poses", "snapshots", "test_every", "mass_kda", "cache_dir"):
            d.pop(free)
        return d
