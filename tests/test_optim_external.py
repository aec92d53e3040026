"""Optimisers by import path (`optim/external.py`): counted, calibrated and resumable, checked
on a quadratic with known minimiser and curvature, and through `reconstruct`."""

from __future__ import annotations

import json

import pytest
import torch

from bad_input_support import reconstruct_argv, refused, sim  # noqa: F401
from cryostoch.cli.main import main
from cryostoch.optim.external import ExternalOptimizer, load_optimizer_class
from cryostoch.optim.factory import make_optimizer

CURVATURE = 4.0


def quadratic_closure(x: torch.Tensor):
    """f = a/2 ||x||^2 (gradient a x, curvature a everywhere)."""
    def closure() -> torch.Tensor:
        x.grad = None
        loss = 0.5 * CURVATURE * (x * x).sum()
        loss.backward()
        return loss.detach()
    return closure


def test_calibrated_step_of_torch_sgd_lands_on_the_minimum_of_a_quadratic():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = make_optimizer("torch.optim:SGD", [x])
    assert isinstance(opt, ExternalOptimizer)
    opt.step(quadratic_closure(x))
    # lr = 1 / L = 1 / a: one gradient step reaches the minimiser; 3 evaluations (gradient,
    # curvature, the wrapped step)
    assert torch.allclose(x.detach(), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert opt.last_step_closure_calls == 3
    assert abs(opt.param_groups[0]["lr"] - 1 / CURVATURE) < 1e-6


def test_a_given_rate_is_used_as_is_and_costs_one_evaluation():
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = make_optimizer("torch.optim:SGD", [x], lr=0.1)
    opt.step(quadratic_closure(x))
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64) * (1 - 0.1 * CURVATURE)
    assert torch.allclose(x.detach(), expected)
    assert opt.last_step_closure_calls == 1


def test_the_wrapped_state_resumes_exactly():
    def run(split: bool) -> torch.Tensor:
        x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
        opt = make_optimizer("torch.optim:Adam", [x], lr=0.05, betas=(0.8, 0.9))
        for _ in range(3):
            opt.step(quadratic_closure(x))
        if split:
            saved = opt.state_dict()
            x = x.detach().clone().requires_grad_(True)
            opt = make_optimizer("torch.optim:Adam", [x], lr=0.05, betas=(0.8, 0.9))
            opt.load_state_dict(saved)
        for _ in range(2):
            opt.step(quadratic_closure(x))
        return x.detach()

    assert torch.equal(run(False), run(True))


@pytest.mark.parametrize("path", ["no_such_module_xyz:Opt", "torch.optim:NoSuchOpt", "math:pi"])
def test_paths_that_are_not_optimisers_are_refused(path):
    with pytest.raises(ValueError, match="optimiser|Optimizer"):
        load_optimizer_class(path)


def test_reconstruct_runs_an_optimiser_given_by_import_path(sim, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "adam"
    assert main(reconstruct_argv(sim, out, "--optimizer", "torch.optim:Adam")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["optimizer"] == "torch.optim:Adam"
    refused(capsys, reconstruct_argv(sim, tmp_path / "bad", "--optimizer", "torch.optim:Nope"),
            "torch.optim:Nope")
    assert not (tmp_path / "bad").exists()
