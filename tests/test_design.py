"""Mechanism design (pydso.problems.design): the co-designed input gain of a linear plant against a fine grid of
exact Riccati costs (scipy.linalg.solve_discrete_are), and bad input."""

import jax
import numpy as np
import optax
import pytest
import scipy.linalg

import pydso
from pydso.problems.control import LinearPolicy
from pydso.problems.design import design

A, Q, R, C, SIGMA, S0, GAMMA, H = 1.2, 1.0, 1.0, 1.0, 0.5, 1.0, 0.9, 150


def riccati(b):
    """Discounted LQR of x' = a x + b u + w: the value matrix P(b) and the optimal gain k(b) (u = -k x)."""
    a_, b_ = np.array([[np.sqrt(GAMMA) * A]]), np.array([[np.sqrt(GAMMA) * b]])
    P = scipy.linalg.solve_discrete_are(a_, b_, np.array([[Q]]), np.array([[R]]))[0, 0]
    k = GAMMA * b * P * A / (R + GAMMA * b * b * P)
    return P, k


def exact_cost(b):
    """min over k of E[sum_t gamma^t (q x^2 + r u^2)] + c b^2, x0 ~ N(0, s0^2), w ~ N(0, sigma^2) (H -> inf)."""
    P, _ = riccati(b)
    return P * (S0**2 + GAMMA * SIGMA**2 / (1 - GAMMA)) + C * b * b


def make(**change):
    kw = dict(
        plant=lambda x, u, phi: A * x + phi["b"] * u,
        policy=LinearPolicy(np.array([[0.5]])),
        design0={"b": 1.0},
        cost=lambda x, u, phi: Q * x[0] ** 2 + R * u[0] ** 2,
        design_cost=lambda phi: C * phi["b"] ** 2,
        initial=pydso.Normal([0.0], [S0]),
        horizon=H,
        gamma=GAMMA,
        bounds={"b": (0.05, 5.0)},
        noise=SIGMA,
    )
    return design(**{**kw, **change})


def test_linear_codesign_matches_riccati_grid():
    grid = np.linspace(0.2, 3.0, 281)
    resolution = grid[1] - grid[0]
    costs = np.array([exact_cost(b) for b in grid])
    b_grid = grid[np.argmin(costs)]
    assert grid[0] < b_grid < grid[-1]  # an interior optimum: the trade-off is real

    p = make()
    steps = 300
    optimizer = optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.01))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float (see tests/conftest.py)
        out = pydso.minimize(
            p.problem, p.theta0, key=jax.random.key(0), method=pydso.Gradient(optimizer, n=256), steps=steps
        )
    b = float(p.physical(out.theta)["b"])
    assert abs(b - b_grid) <= resolution, (b, b_grid, resolution)
    # the policy found with it is the Riccati gain of that design
    _, k = riccati(b)
    np.testing.assert_allclose(float(out.theta["policy"].gain[0, 0]), k, rtol=2e-2)
    # and the reported objective is the exact optimal cost of that design, within Monte-Carlo error
    report = p.result(out.theta, n=2048)
    assert abs(report.objective - exact_cost(b)) < 4 * report.objective_stderr + 1e-3 * exact_cost(b), report
    np.testing.assert_allclose(report.design_cost, C * b * b, rtol=1e-12)


def test_physical_transform_round_trip_and_unbounded():
    p = make()
    np.testing.assert_allclose(float(p.physical(p.theta0)["b"]), 1.0, rtol=1e-12)
    free = make(bounds=None)
    assert float(free.theta0["design"]["b"]) == 1.0


def test_bad_input_names_the_argument():
    cases = [
        (dict(bounds={"b": (2.0, 5.0)}), "design0"),
        (dict(bounds={"b": (5.0, 0.1)}), "low must be < high"),
        (dict(bounds={"b": (0.0, np.inf)}), "finite"),
        (dict(bounds={"c": (0.0, 1.0)}), "bounds"),
        (dict(design0={"b": np.nan}), "design0"),
        (dict(design0={}), "design0"),
        (dict(design_cost=lambda phi: phi["b"] * np.ones(2)), "design_cost"),
        (dict(design_cost=3.0), "design_cost"),
        (dict(plant=None), "plant"),
        (dict(initial=None), "initial"),
        (dict(horizon=0), "horizon"),
        (dict(gamma=0.0), "gamma"),
        (dict(noise=-0.1), "noise"),
        (dict(policy=LinearPolicy(np.ones((1, 3)))), "closed loop"),
    ]
    for change, word in cases:
        with pytest.raises(pydso.ProblemError, match=word):
            make(**change)
