"""Tests of cryostoch.optim on problems with known answers."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from cryostoch.optim import (
    OPTIMIZERS,
    SGD,
    TONGA,
    AdaGrad,
    Adam,
    ClassicalMomentum,
    HessianFree,
    NesterovMomentum,
    OnlineLBFGS,
    annealed_lr,
    estimate_curvature_scale,
    make_optimizer,
    momentum_schedule,
)
from cryostoch.optim.lbfgs import LAMBDA_REL
from cryostoch.optim.schedules import momentum_schedule_printed

ALL = ["sgd", "momentum", "nesterov", "adagrad", "tonga", "olbfgs", "hf", "adam"]
F64 = torch.float64


# ----------------------------------------------------------------------------- problems
def spd_quadratic(n: int, log10_cond: float, seed: int = 0, dtype=F64):
    """A = Q diag(logspace) Q^T, b random; returns A, b, A^-1 b, eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    ev = torch.logspace(0.0, log10_cond, n, dtype=F64)
    a = q @ torch.diag(ev) @ q.T
    a = 0.5 * (a + a.T)
    b = torch.randn(n, generator=g, dtype=F64)
    return a.to(dtype), b.to(dtype), torch.linalg.solve(a, b).to(dtype), ev


class NoisyQuadratic:
    """f_k(x) = 0.5 x^T A x - (b + xi_k)^T x: minibatch k has a fixed noise vector xi_k, so
    repeated closure calls within a step see the same "minibatch" (deterministic in k)."""

    def __init__(self, n=6, log10_cond=1.0, noise=0.0, seed=0, dtype=F64, steps=64):
        self.a, self.b, self.xstar, self.ev = spd_quadratic(n, log10_cond, seed, dtype)
        g = torch.Generator().manual_seed(seed + 1)
        self.xi = (noise * torch.randn(steps, n, generator=g, dtype=F64)).to(dtype)
        self.k = 0

    def closure_for(self, x: torch.Tensor, record: list | None = None):
        def closure():
            x.grad = None
            with torch.enable_grad():
                loss = 0.5 * x @ self.a @ x - (self.b + self.xi[self.k]) @ x
                loss.backward()
            if record is not None:
                record.append((x.detach().clone(), x.grad.detach().clone()))
            return loss.detach()
        return closure


def quad_closure(x, a, b):
    def closure():
        x.grad = None
        with torch.enable_grad():
            loss = 0.5 * x @ a @ x - b @ x
            loss.backward()
        return loss.detach()
    return closure


def start_point(n, seed=3, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=F64).to(dtype).requires_grad_(True)


# ----------------------------------------------------------------------------- schedules
def test_annealed_lr_values():
    assert annealed_lr(0.5, 0) == 0.5
    assert annealed_lr(2.0, 100) == pytest.approx(2.0 * 2.0 ** -0.75, rel=1e-15)
    assert annealed_lr(1.0, 1000, decay=1e-2) == pytest.approx(11.0 ** -0.75, rel=1e-15)
    assert annealed_lr(3.0, 12345, decay=0.0) == 3.0
    with pytest.raises(ValueError):
        annealed_lr(1.0, -1)
    with pytest.raises(ValueError):
        annealed_lr(1.0, 3, decay=-1e-2)


def test_momentum_schedule_hand_values():
    # m = floor(t/100) + 1;  1 - 2^(-1 - log2 m) = 1 - 1/(2m), capped at 0.9
    assert momentum_schedule(0) == 0.5            # m = 1: 1 - 2^-1
    assert momentum_schedule(99) == 0.5           # m = 1
    assert momentum_schedule(100) == 0.75         # m = 2: 1 - 2^-2
    assert momentum_schedule(200) == pytest.approx(5.0 / 6.0, rel=1e-15)  # m = 3
    assert momentum_schedule(300) == 0.875        # m = 4: 1 - 2^-3
    assert momentum_schedule(399) == 0.875
    assert momentum_schedule(400) == 0.9          # m = 5: 1 - 1/10 = 0.9
    assert momentum_schedule(10 ** 5) == 0.9      # m = 1001: 0.9995 -> capped
    for t in [0, 57, 99, 100, 250, 300, 399, 400, 1234, 10 ** 5]:
        assert momentum_schedule(t) == pytest.approx(momentum_schedule_printed(t), abs=1e-15)
    with pytest.raises(ValueError):
        momentum_schedule(-1)


# ----------------------------------------------------------------------------- vs torch.optim
def _fixed_problem(dtype=F64):
    """A smooth non-quadratic problem: sum log cosh + quadratic, in two parameter tensors."""
    g = torch.Generator().manual_seed(11)
    m = torch.randn(7, 5, generator=g, dtype=F64).to(dtype)
    y = torch.randn(7, generator=g, dtype=F64).to(dtype)
    w0 = torch.randn(5, generator=g, dtype=F64).to(dtype)
    c0 = torch.randn(3, 2, generator=g, dtype=F64).to(dtype)

    def make():
        w = w0.clone().requires_grad_(True)
        c = c0.clone().requires_grad_(True)

        def closure():
            w.grad = None
            c.grad = None
            with torch.enable_grad():
                loss = torch.log(torch.cosh(m @ w - y)).sum() + 0.3 * (c ** 2).sum() \
                    + 0.1 * (c.sum() * w.sum()) ** 2
                loss.backward()
            return loss.detach()
        return [w, c], closure
    return make


def _run_pair(ours_factory, torch_factory, steps, scheduler=None):
    make = _fixed_problem()
    p1, cl1 = make()
    p2, cl2 = make()
    ours = ours_factory(p1)
    ref = torch_factory(p2)
    sched = scheduler(ref) if scheduler else None
    for _ in range(steps):
        ours.step(cl1)
        ref.zero_grad()
        cl2()
        ref.step()
        if sched is not None:
            sched.step()
    return p1, p2


def test_sgd_matches_torch_exactly():
    p1, p2 = _run_pair(lambda p: SGD(p, lr=0.05, anneal=0.0),
                       lambda p: torch.optim.SGD(p, lr=0.05), 6)
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)


def test_annealed_sgd_matches_torch_lambdalr_exactly():
    p1, p2 = _run_pair(
        lambda p: SGD(p, lr=0.3, anneal=0.5),
        lambda p: torch.optim.SGD(p, lr=0.3), 6,
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
            o, lambda t: (1.0 + 0.5 * t) ** -0.75))
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)


def test_classical_momentum_matches_torch_with_constant_rates():
    p1, p2 = _run_pair(lambda p: ClassicalMomentum(p, lr=0.05, momentum=0.9, anneal=0.0),
                       lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 8)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_adagrad_matches_torch_exactly():
    p1, p2 = _run_pair(lambda p: AdaGrad(p, lr=0.1),
                       lambda p: torch.optim.Adagrad(p, lr=0.1, foreach=False), 6)
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)


def test_adagrad_damping_is_torch_adagrad_with_a_larger_eps_and_rate():
    """damping d: delta = d * RMS of the first gradient over all parameters, the rate times
    (1 + d); i.e. torch's Adagrad with lr (1 + d) eta and eps + delta."""
    d, eta = 2.5, 0.1
    p0, cl0 = _fixed_problem()()
    cl0()
    g1 = torch.cat([p.grad.reshape(-1) for p in p0])
    delta = float(g1.pow(2).mean().sqrt())
    p1, p2 = _run_pair(lambda p: AdaGrad(p, lr=eta, damping=d),
                       lambda p: torch.optim.Adagrad(p, lr=(1 + d) * eta, eps=1e-10 + d * delta,
                                                     foreach=False), 6)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_adam_matches_torch_exactly(dtype):
    make = _fixed_problem(dtype)
    p1, cl1 = make()
    p2, cl2 = make()
    ours = Adam(p1, lr=0.01)
    ref = torch.optim.Adam(p2, lr=0.01, foreach=False)
    for _ in range(7):
        ours.step(cl1)
        ref.zero_grad()
        cl2()
        ref.step()
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)


def test_nesterov_lookahead_points_are_torch_nesterov_iterates():
    """torch's nesterov=True keeps y_t = x_t + mu v_t; our closure is called exactly there."""
    prob = NoisyQuadratic(n=5, noise=0.0)
    x = start_point(5)
    y = x.detach().clone().requires_grad_(True)
    record: list = []
    ours = NesterovMomentum([x], lr=0.04, momentum=0.8, anneal=0.0)
    ref = torch.optim.SGD([y], lr=0.04, momentum=0.8, nesterov=True)
    ref_points = []
    closure_y = prob.closure_for(y)
    for _ in range(10):
        ref_points.append(y.detach().clone())
        ours.step(prob.closure_for(x, record))
        ref.zero_grad()
        closure_y()
        ref.step()
    for (look, _), yt in zip(record, ref_points, strict=True):
        torch.testing.assert_close(look, yt, rtol=1e-13, atol=1e-13)


def test_nesterov_matches_sutskever_reference_with_schedules():
    """Independent loop: v <- mu_t v - eta_t grad(x + mu_t v); x <- x + v (paper schedules)."""
    prob = NoisyQuadratic(n=6, noise=0.3, steps=256)
    a, b = prob.a, prob.b
    x = start_point(6)
    opt = NesterovMomentum([x], lr=0.05, anneal=1e-2)
    xr = x.detach().clone()
    v = torch.zeros_like(xr)
    for t in range(230):          # crosses the momentum changes at t = 100 and 200
        prob.k = t
        opt.step(prob.closure_for(x))
        mu = momentum_schedule(t)
        eta = 0.05 * (1 + 1e-2 * t) ** -0.75
        look = xr + mu * v
        grad = a @ look - (b + prob.xi[t])
        v = mu * v - eta * grad
        xr = xr + v
    torch.testing.assert_close(x.detach(), xr, rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("name", ALL)
def test_deterministic_quadratic_converges_with_default_lr(name):
    n = 10
    a, b, xstar, _ = spd_quadratic(n, 1.0, seed=5)
    x = start_point(n)
    e0 = float((x.detach() - xstar).norm())
    opt = make_optimizer(name, [x])        # lr=None: calibrated defaults
    closure = quad_closure(x, a, b)
    # olbfgs: its default lambda (0.1 L) trades speed on a clean problem for robustness to
    # minibatch noise (485 steps here, 400 with lambda = 1e-3 L)
    budget = {"hf": 40, "olbfgs": 600}.get(name, 3000)
    tol = 1e-4 if name == "adagrad" else 1e-6
    err = 1.0
    for _ in range(budget):
        opt.step(closure)
        err = float((x.detach() - xstar).norm()) / e0
        if err < tol:
            break
    assert err < tol, f"{name}: relative error {err:.2e} after {budget} steps"


def _least_squares(seed=1):
    g = torch.Generator().manual_seed(seed)
    n, big_n = 6, 2000
    d = torch.randn(big_n, n, generator=g, dtype=F64) * torch.linspace(0.3, 2.0, n, dtype=F64)
    xt = torch.randn(n, generator=g, dtype=F64)
    y = d @ xt + 0.5 * torch.randn(big_n, generator=g, dtype=F64)
    reg = 1e-2
    h = d.T @ d / big_n + reg * torch.eye(n, dtype=F64)
    xstar = torch.linalg.solve(h, d.T @ y / big_n)
    return d, y, reg, xstar


@pytest.mark.parametrize("name", ALL)
def test_noisy_least_squares_converges_in_expectation(name):
    """Minibatch least squares (noise in the Hessian and the gradient): the average of the
    late iterates approaches the full-data minimiser (D^T D / N + r I)^-1 D^T y / N."""
    d, y, reg, xstar = _least_squares()
    n = d.shape[1]
    x = torch.zeros(n, dtype=F64, requires_grad=True)
    opt = make_optimizer(name, [x])
    gen = torch.Generator().manual_seed(7)
    batch = {"hf": 60}.get(name, 20)
    steps = {"hf": 333}.get(name, 1000)
    idx = [None]

    def closure():
        x.grad = None
        with torch.enable_grad():
            r = d[idx[0]] @ x - y[idx[0]]
            loss = 0.5 * (r ** 2).mean() + 0.5 * reg * (x @ x)
            loss.backward()
        return loss.detach()

    e0 = float(xstar.norm())
    tail = []
    for k in range(steps):
        idx[0] = torch.randint(0, d.shape[0], (batch,), generator=gen)
        opt.step(closure)
        if k >= steps // 2:
            tail.append(x.detach().clone())
    avg = torch.stack(tail).mean(0)
    assert float((avg - xstar).norm()) / e0 < 0.025
    assert float((x.detach() - xstar).norm()) / e0 < 0.3


def test_online_lbfgs_reaches_optimum_in_few_iterations():
    n = 10
    a, b, xstar, _ = spd_quadratic(n, 2.0, seed=0)   # condition number 100
    x = start_point(n)
    e0 = float((x.detach() - xstar).norm())
    opt = OnlineLBFGS([x], lr=1.0, anneal=0.0, damping=0.0)
    closure = quad_closure(x, a, b)
    it = 0
    while it < 3 * n and float((x.detach() - xstar).norm()) / e0 >= 1e-8:
        opt.step(closure)
        it += 1
    assert float((x.detach() - xstar).norm()) / e0 < 1e-8, f"not converged after {it} steps"
    # plain SGD at its best constant rate 2 / (l_min + l_max) is still far after as many steps
    z = start_point(n)
    sgd = SGD([z], lr=2.0 / (1.0 + 100.0), anneal=0.0)
    for _ in range(it):
        sgd.step(quad_closure(z, a, b))
    assert float((z.detach() - xstar).norm()) / e0 > 1e-2


@pytest.mark.parametrize("damping", [0.0, 0.37])
def test_online_lbfgs_curvature_pair_carries_the_model_trust_term(damping):
    # on a quadratic f = x^T A x / 2 - b^T x the stored pair must be y = (A + lambda) s
    n = 6
    a, b, _, _ = spd_quadratic(n, 1.0, seed=3)
    x = start_point(n)
    opt = OnlineLBFGS([x], lr=0.5, anneal=0.0, damping=damping, init_scale=0.1)
    opt.step(quad_closure(x, a, b))
    assert opt.model_trust == damping
    s, y = opt.state[x]["s"][0], opt.state[x]["y"][0]
    torch.testing.assert_close(y, a @ s + damping * s, rtol=1e-10, atol=1e-12)


def test_online_lbfgs_default_lambda_is_relative_to_the_calibrated_curvature():
    n = 6
    a, b, _, _ = spd_quadratic(n, 1.0, seed=3)
    x = start_point(n)
    opt = OnlineLBFGS([x])
    opt.step(quad_closure(x, a, b))
    assert opt.model_trust == pytest.approx(LAMBDA_REL / opt._global["init_scale"])


def test_hessian_free_one_step_with_full_cg_on_quadratic():
    n = 8
    a, b, xstar, _ = spd_quadratic(n, 1.0, seed=2)
    x = start_point(n)
    e0 = float((x.detach() - xstar).norm())
    opt = HessianFree([x], cg_iters=n, damping=0.0)
    opt.step(quad_closure(x, a, b))
    assert float((x.detach() - xstar).norm()) / e0 < 1e-5
    assert opt.last_step_closure_calls == 1 + n + 1   # gradient, n Hv products, LM ratio
    # on a quadratic the model is exact: reduction ratio 1, damping decreased (0 stays 0)
    assert opt.state[x]["last_rho"] == pytest.approx(1.0, abs=1e-6)


def test_hessian_free_damping_follows_levenberg_marquardt():
    n = 6
    a, b, _, _ = spd_quadratic(n, 1.0, seed=4)
    x = start_point(n)
    opt = HessianFree([x], cg_iters=2, damping=1.0)
    opt.step(quad_closure(x, a, b))
    assert opt.damping == pytest.approx(2.0 / 3.0)   # quadratic: rho = 1 > 3/4
    # pseudo-Huber sum sqrt(1 + y^2) far from 0: the Newton step overshoots wildly, the loss
    # goes up (rho < 0), so the damping is boosted by 3/2 and the step is undone
    y = torch.tensor([3.0, -2.0], dtype=F64, requires_grad=True)

    def closure():
        y.grad = None
        with torch.enable_grad():
            loss = torch.sqrt(1.0 + y ** 2).sum()
            loss.backward()
        return loss.detach()
    hf = HessianFree([y], cg_iters=2, damping=1e-3)
    hf.step(closure)
    assert hf.state[y]["last_rho"] < 0.0
    assert hf.damping == pytest.approx(1.5e-3)
    assert hf.state[y]["rejected_steps"] == 1
    assert torch.equal(y.detach(), torch.tensor([3.0, -2.0], dtype=F64))
    # with a strong damping the step is a short, accepted gradient-like step
    hf = HessianFree([y], cg_iters=2, damping=10.0)
    hf.step(closure)
    assert hf.state[y]["rejected_steps"] == 0
    assert float(closure()) < math.sqrt(10.0) + math.sqrt(5.0)


def test_tonga_matches_independent_low_rank_natural_gradient():
    """Reference: explicit n x n covariance, eigendecomposition truncation and solve."""
    n, rank, every, gamma, damping, lr, anneal = 6, 2, 3, 0.5, 0.3, 0.1, 0.05
    prob = NoisyQuadratic(n=n, noise=1.0, steps=64)
    x = start_point(n)
    opt = TONGA([x], lr=lr, rank=rank, refresh_every=every, covariance_decay=gamma,
                damping=damping, anneal=anneal)
    a = prob.a.numpy()
    b = prob.b.numpy()
    xr = x.detach().numpy().copy()
    cov = None
    buf = []
    for t in range(14):
        prob.k = t
        opt.step(prob.closure_for(x))
        g = a @ xr - (b + prob.xi[t].numpy())
        if cov is None:
            direction = g
        else:
            lam = damping * np.linalg.eigvalsh(cov).max()
            direction = lam * np.linalg.solve(cov + lam * np.eye(n), g)
        xr = xr - lr * (1 + anneal * t) ** -0.75 * direction
        buf.append(g)
        if len(buf) == every:
            new = (1 - gamma) / every * sum(np.outer(v, v) for v in buf)
            full = new if cov is None else gamma * cov + new
            w, v = np.linalg.eigh(full)
            top = np.argsort(w)[::-1][:rank]
            cov = (v[:, top] * w[top]) @ v[:, top].T
            buf = []
        np.testing.assert_allclose(x.detach().numpy(), xr, rtol=1e-10, atol=1e-11)
    assert opt.state[x]["refreshes"] == 4


# ----------------------------------------------------------------------------- counting
@pytest.mark.parametrize("name,per_step", [("sgd", 1), ("momentum", 1), ("nesterov", 1),
                                           ("adagrad", 1), ("adam", 1), ("tonga", 1),
                                           ("olbfgs", 2)])
def test_closure_calls_per_step(name, per_step):
    prob = NoisyQuadratic(n=4)
    x = start_point(4)
    opt = make_optimizer(name, [x], lr=0.01)
    extra_first = 1 if name == "olbfgs" else 0   # olbfgs calibrates H^0 = 1 / L
    opt.step(prob.closure_for(x))
    assert opt.last_step_closure_calls == per_step + extra_first
    for _ in range(3):
        opt.step(prob.closure_for(x))
        assert opt.last_step_closure_calls == per_step
    assert opt.closure_calls == 4 * per_step + extra_first
    assert opt.gradient_evaluations_per_image == opt.closure_calls


def test_closure_call_counts_with_calibration_and_explicit_scales():
    prob = NoisyQuadratic(n=4)
    x = start_point(4)
    sgd = SGD([x])                          # lr=None: one extra call at the first step
    sgd.step(prob.closure_for(x))
    assert sgd.last_step_closure_calls == 2
    sgd.step(prob.closure_for(x))
    assert sgd.last_step_closure_calls == 1 and sgd.closure_calls == 3
    assert sgd.calibrated_curvature is not None
    ada = AdaGrad([x])                      # lr from RMS(x): no extra call
    ada.step(prob.closure_for(x))
    assert ada.last_step_closure_calls == 1
    z = torch.zeros(4, dtype=F64, requires_grad=True)
    ada0 = AdaGrad([z])                     # x = 0: falls back to the curvature
    ada0.step(prob.closure_for(z))
    assert ada0.last_step_closure_calls == 2
    lb = OnlineLBFGS([x], lr=0.1, init_scale=0.1)   # nothing to calibrate
    lb.step(prob.closure_for(x))
    assert lb.last_step_closure_calls == 2


def test_hessian_free_closure_call_counts():
    prob = NoisyQuadratic(n=6)
    x = start_point(6)
    hf = HessianFree([x], cg_iters=5, damping=0.1)
    hf.step(prob.closure_for(x))
    assert hf.last_step_closure_calls == 1 + 5 + 1            # no warm start yet
    hf.step(prob.closure_for(x))
    assert hf.last_step_closure_calls == 1 + 1 + 5 + 1        # + warm-start residual
    hf2 = HessianFree([x], cg_iters=3, damping=0.1, adapt_damping=False, cg_decay=0.0)
    for _ in range(2):
        hf2.step(prob.closure_for(x))
        assert hf2.last_step_closure_calls == 1 + 3
    hf3 = HessianFree([x], cg_iters=3)                       # damping=None: calibrated
    hf3.step(prob.closure_for(x))
    assert hf3.last_step_closure_calls == 1 + 1 + 3 + 1
    assert hf3.closure_calls == 6


def test_step_without_closure_counts_the_callers_gradient():
    prob = NoisyQuadratic(n=3)
    x = start_point(3)
    opt = SGD([x], lr=0.1)
    prob.closure_for(x)()
    opt.step()
    assert opt.closure_calls == 1
    with pytest.raises(ValueError):
        SGD([x]).step()                         # lr=None needs a closure
    with pytest.raises(ValueError):
        NesterovMomentum([x], lr=0.1).step()    # look-ahead gradient needs a closure
    with pytest.raises(ValueError):
        OnlineLBFGS([x], lr=0.1).step()
    with pytest.raises(ValueError):
        HessianFree([x]).step()


# ----------------------------------------------------------------------------- checkpoints
ROUND_TRIP_OPTIONS = {
    "adagrad": {"damping": 2.0},  # delta, from the first gradient, must come back too
    "tonga": {"rank": 2, "refresh_every": 3},
    "olbfgs": {"history": 3},
    "hf": {"cg_iters": 3},
}


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_gives_identical_trajectory(name):
    k = 7
    prob = NoisyQuadratic(n=5, noise=0.5, dtype=torch.float32, steps=2 * k)
    options = ROUND_TRIP_OPTIONS.get(name, {})
    # uninterrupted 2k steps (lr=None: the calibrated rate must be restored too)
    x = start_point(5, dtype=torch.float32)
    opt = make_optimizer(name, [x], **options)
    for t in range(2 * k):
        prob.k = t
        opt.step(prob.closure_for(x))
    # k steps, checkpoint through bytes, fresh tensor and optimiser, k more steps
    y = start_point(5, dtype=torch.float32)
    first = make_optimizer(name, [y], **options)
    for t in range(k):
        prob.k = t
        first.step(prob.closure_for(y))
    buf = io.BytesIO()
    torch.save({"x": y.detach(), "opt": first.state_dict()}, buf)
    for t in range(k, 2 * k):              # the old optimiser goes on (must not matter)
        prob.k = t
        first.step(prob.closure_for(y))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    z = ckpt["x"].clone().requires_grad_(True)
    second = make_optimizer(name, [z], **options)
    second.load_state_dict(ckpt["opt"])
    for t in range(k, 2 * k):
        prob.k = t
        second.step(prob.closure_for(z))
    assert torch.equal(z.detach(), x.detach())
    assert second.closure_calls == opt.closure_calls
    assert second.iteration == opt.iteration == 2 * k
    assert second.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_loaded_state_does_not_alias_the_source_optimiser():
    prob = NoisyQuadratic(n=4, noise=0.5, steps=16)
    x = start_point(4)
    first = ClassicalMomentum([x], lr=0.05)
    for t in range(3):
        prob.k = t
        first.step(prob.closure_for(x))
    y = x.detach().clone().requires_grad_(True)
    second = ClassicalMomentum([y], lr=0.05)
    second.load_state_dict(first.state_dict())       # in memory, no serialisation
    for t in range(3, 6):
        prob.k = t
        first.step(prob.closure_for(x))
        second.step(prob.closure_for(y))
    assert torch.equal(x.detach(), y.detach())


# ----------------------------------------------------------------------------- calibration
def test_curvature_estimate_lies_between_extreme_eigenvalues():
    n = 12
    a, b, _, ev = spd_quadratic(n, 2.0, seed=8)
    for seed in range(5):
        x = start_point(n, seed=seed)
        x0 = x.detach().clone()
        est = estimate_curvature_scale(quad_closure(x, a, b), [x])
        lo, hi = float(ev.min()), float(ev.max())
        assert lo * (1 - 1e-6) <= est.scale <= hi * (1 + 1e-6)
        assert lo * (1 - 1e-6) <= est.rayleigh <= est.scale * (1 + 1e-9)
        assert float(est) == est.scale
        assert est.closure_calls == 2
        assert torch.equal(x.detach(), x0)                 # parameters restored exactly
        torch.testing.assert_close(x.grad, a @ x0 - b)     # .grad = gradient at x
        # exact value: ||A g|| / ||g||
        g = a @ x0 - b
        assert est.scale == pytest.approx(float((a @ g).norm() / g.norm()), rel=1e-5)


def test_curvature_estimate_power_iterations_reach_largest_eigenvalue():
    n = 10
    a, b, _, ev = spd_quadratic(n, 1.0, seed=9)
    x = start_point(n)
    closure = quad_closure(x, a, b)
    closure()
    est = estimate_curvature_scale(closure, [x], [x.grad.clone()], power_iterations=60)
    assert est.closure_calls == 60
    assert est.scale == pytest.approx(float(ev.max()), rel=1e-3)


def test_default_lrs_follow_documented_constants():
    n = 8
    a, b, _, _ = spd_quadratic(n, 1.0, seed=1)
    x = start_point(n)
    x0 = x.detach().clone()
    closure = quad_closure(x, a, b)
    g = a @ x0 - b
    big_l = float((a @ g).norm() / g.norm())
    rms = float(x0.norm()) / math.sqrt(n)
    expected = {"sgd": 1.0 / big_l, "momentum": 0.1 / big_l, "nesterov": 0.1 / big_l,
                "tonga": 1.0 / big_l, "adagrad": 0.1 * rms, "adam": 0.05 * rms,
                "olbfgs": 0.1, "hf": 1.0}
    for name, lr in expected.items():
        with torch.no_grad():
            x.copy_(x0)
        opt = make_optimizer(name, [x])
        opt.step(closure)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-5), name
    with torch.no_grad():
        x.copy_(x0)
    cm = ClassicalMomentum([x], momentum=0.5)
    cm.step(closure)
    assert cm.param_groups[0]["lr"] == pytest.approx(0.5 / big_l, rel=1e-5)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name,kwargs", [
    ("sgd", {"lr": -0.1}),
    ("sgd", {"lr": 0.0}),
    ("sgd", {"lr": float("nan")}),
    ("sgd", {"anneal": -1.0}),
    ("momentum", {"momentum": 1.0}),
    ("momentum", {"momentum": -0.1}),
    ("nesterov", {"momentum": 1.5}),
    ("nesterov", {"mu_max": 1.0}),
    ("adagrad", {"eps": -1e-10}),
    ("adagrad", {"damping": -1.0}),
    ("adam", {"betas": (0.9, 1.0)}),
    ("adam", {"betas": (-0.1, 0.999)}),
    ("tonga", {"rank": 0}),
    ("tonga", {"rank": 2.5}),
    ("tonga", {"refresh_every": 0}),
    ("tonga", {"damping": 0.0}),
    ("tonga", {"covariance_decay": 1.0}),
    ("olbfgs", {"history": 0}),
    ("olbfgs", {"damping": -1.0}),
    ("olbfgs", {"init_scale": 0.0}),
    ("hf", {"cg_iters": 0}),
    ("hf", {"damping": -1.0}),
    ("hf", {"cg_decay": 1.5}),
    ("hf", {"boost": 0.5}),
    ("hf", {"drop": 0.0}),
    ("hf", {"fd_rel": 0.0}),
    ("sgd", {"no_such_option": 1}),
])
def test_bad_hyperparameters_raise_value_error(name, kwargs):
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError):
        make_optimizer(name, [x], **kwargs)


def test_factory_names_aliases_and_groups():
    x = torch.zeros(3, requires_grad=True)
    for name, cls in OPTIMIZERS.items():
        assert type(make_optimizer(name, [x], lr=0.1)) is cls
    assert type(make_optimizer("NAG", [x], lr=0.1)) is NesterovMomentum
    assert type(make_optimizer("cm", [x], lr=0.1)) is ClassicalMomentum
    assert type(make_optimizer("lbfgs", [x], lr=0.1)) is OnlineLBFGS
    assert type(make_optimizer("hessian_free", [x])) is HessianFree
    with pytest.raises(ValueError):
        make_optimizer("rmsprop", [x])
    y = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError):       # vector methods act on one parameter group
        TONGA([{"params": [x]}, {"params": [y], "lr": 0.2}], lr=0.1)
    sgd = SGD([{"params": [x]}, {"params": [y], "lr": 0.2}], lr=0.1, anneal=0.0)
    x.grad = torch.ones(3)
    y.grad = torch.ones(2)
    sgd.step()
    assert torch.allclose(x, torch.full((3,), -0.1)) and torch.allclose(y, torch.full((2,), -0.2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name):
    n = 16
    a, b, _, _ = spd_quadratic(n, 1.0, seed=3)
    trajs = []
    for device in ["cpu", "cuda"]:
        ad, bd = a.to(device), b.to(device)
        x = start_point(n).detach().to(device).requires_grad_(True)
        opt = make_optimizer(name, [x], **ROUND_TRIP_OPTIONS.get(name, {}))
        for _ in range(8):
            opt.step(quad_closure(x, ad, bd))
        trajs.append(x.detach().cpu())
    torch.testing.assert_close(trajs[0], trajs[1], rtol=1e-8, atol=1e-10)
