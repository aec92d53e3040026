"""On a GPU: the likelihood, a whole reconstruction and a 2-rank NCCL run against the CPU.

Marked `cuda` (`pytest -m cuda`, what benchmarks/gpu_check.sh runs); skipped without CUDA.
The CPU is the independent reference: the same float64 arithmetic in another library
(cuBLAS/cuFFT against MKL/pocketfft) and another summation order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import random_ctf
from cryostoch.cli.main import main
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.model.objective import minibatch_objective
from cryostoch.model.prior import PriorConfig
from distributed_support import (
    fsc_inside_cutoff,
    launch,
    needs_torchrun,
    reconstruct_args,
    simulated_particles,
)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    return simulated_particles(tmp_path_factory.mktemp("cuda") / "sim")


def test_objective_and_gradient_on_cuda_match_the_cpu():
    config = LikelihoodConfig(box_size=32, pixel_size_a=4.0, max_radius_px=6.0,
                              shift_radius_px=2.0)
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(32, 32, 32, generator=g, dtype=torch.float64)
    images = torch.randn(12, 32, 32, generator=g, dtype=torch.float64)
    ctf = random_ctf(12, 1)
    results = []
    for device in ("cpu", "cuda"):
        model = MarginalLikelihood(config, dtype=torch.float64, device=torch.device(device))
        out = minibatch_objective(volume.to(device), model.image_blocks(images.to(device)),
                                  ctf, model, PriorConfig(), 1000)
        results.append((out.value.cpu(), out.gradient.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=0.0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-8, atol=1e-12)


def test_reconstruct_on_cuda_gives_the_map_of_the_cpu(particles, tmp_path):
    for device in ("cpu", "cuda"):
        assert main(reconstruct_args(particles, tmp_path / device, "--device", device,
                                     "--dtype", "float64")) == 0
    assert (fsc_inside_cutoff(tmp_path / "cpu", tmp_path / "cuda") > 0.99).all()


@needs_torchrun
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_processes_give_the_map_of_one_gpu(particles, tmp_path):
    """--device cuda under torchrun: each rank on cuda:LOCAL_RANK, sums over NCCL."""
    for n in (1, 2):
        launch(n, *reconstruct_args(particles, tmp_path / f"ranks{n}", "--device", "cuda"))
    assert (fsc_inside_cutoff(tmp_path / "ranks1", tmp_path / "ranks2") > 0.99).all()
    info = json.loads((tmp_path / "ranks2" / "config.json").read_text())
    assert info["world_size"] == 2 and info["config"]["device"] == "cuda:0"
