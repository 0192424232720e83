"""Hessian-vector estimates against pydso.exact.hessian (tabular chain) and autodiff of the LQR closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_tabular_problem
from jax.flatten_util import ravel_pytree

import pydso
from pydso.estimators import hessian_vector
from pydso.optimize import steihaug_cg


def test_score_hessian_vector_matches_exact_tabular():
    problem, theta = random_tabular_problem(0, 3, gamma=0.6, horizon=40)  # gamma^40 ~ 1e-9: truncation negligible
    H = pydso.exact.hessian(problem, theta)
    flat, unravel = ravel_pytree(theta)
    v = jax.random.normal(jax.random.key(5), flat.shape)
    est = hessian_vector(problem, theta, unravel(v), key=jax.random.key(1), n=2000, method="score")
    h, se = ravel_pytree(est.gradient)[0], ravel_pytree(est.stderr)[0]
    z = np.abs(np.asarray(h - H @ v)) / np.asarray(se)
    assert np.all(z < 3.0), z
    # and the estimate is informative: relative error well below 1
    assert np.linalg.norm(h - H @ v) / np.linalg.norm(H @ v) < 0.15


# scalar LQR x' = (a - b k) x + sigma w, cost (q + r k^2) x^2, theta = (k, log sigma), x0 ~ N(0, s0^2)
A, B, Q, R, GAMMA, H, S0 = 0.9, 0.5, 1.0, 0.2, 0.9, 20, 1.0


def _lqr_problem():
    def mean(x, th):
        return (A - B * th[0]) * x

    def scale(x, th):
        return jnp.exp(th[1]) * jnp.ones_like(x)

    def cost(x, th):
        return jnp.sum((Q + R * th[0] ** 2) * x**2)

    system = pydso.GaussianChain(mean, scale)
    return pydso.Problem(system, cost, pydso.Episodic(GAMMA, H), pydso.Normal(jnp.zeros(1), S0))


def _lqr_objective(th):
    """E sum_{t<H} gamma^t (q + r k^2) x_t^2 with E x_t^2 = c^{2t} s0^2 + sigma^2 (1 - c^{2t}) / (1 - c^2):
    two finite geometric series."""
    c2 = (A - B * th[0]) ** 2
    sig2 = jnp.exp(2.0 * th[1])

    def geo(z):
        return (1.0 - z**H) / (1.0 - z)

    return (Q + R * th[0] ** 2) * (S0**2 * geo(GAMMA * c2) + sig2 / (1.0 - c2) * (geo(GAMMA) - geo(GAMMA * c2)))


def test_pathwise_hessian_vector_matches_lqr_closed_form():
    problem = _lqr_problem()
    theta = jnp.array([0.6, np.log(0.3)])
    v = jnp.array([0.7, -1.3])
    ref = jax.hessian(_lqr_objective)(theta) @ v
    est = hessian_vector(problem, theta, v, key=jax.random.key(0), n=3000, method="pathwise")
    z = np.abs(np.asarray(est.gradient - ref)) / np.asarray(est.stderr)
    assert np.all(z < 3.0), (est.gradient, ref, z)
    assert abs(float(est.objective) - float(_lqr_objective(theta))) < 3 * float(est.objective_stderr)
    np.testing.assert_allclose(est.gradient, ref, rtol=0.05)  # low variance: a sharp check


def test_steihaug_cg_solves_inside_and_stops_on_the_boundary():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(5, 5))
    Hm = jnp.asarray(M @ M.T + 0.5 * np.eye(5))
    g = jnp.asarray(rng.normal(size=5))
    newton = -jnp.linalg.solve(Hm, g)
    z, info = steihaug_cg(lambda d: Hm @ d, g, jnp.asarray(1e6), max_iters=20, tol=1e-12)
    np.testing.assert_allclose(z, newton, rtol=1e-8)
    np.testing.assert_allclose(info["hz"], Hm @ z, rtol=1e-8)
    assert not bool(info["boundary"])
    r = 0.3 * float(jnp.linalg.norm(newton))
    z, info = steihaug_cg(lambda d: Hm @ d, g, jnp.asarray(r), max_iters=20, tol=1e-12)
    assert bool(info["boundary"])
    np.testing.assert_allclose(float(jnp.linalg.norm(z)), r, rtol=1e-10)
    assert float(g @ z + 0.5 * z @ Hm @ z) < 0.0  # a descent step for the model
    # negative curvature: the step goes to the boundary along it
    z, info = steihaug_cg(lambda d: -d, g, jnp.asarray(2.0), max_iters=20, tol=1e-12)
    np.testing.assert_allclose(float(jnp.linalg.norm(z)), 2.0, rtol=1e-10)


def test_hessian_vector_bad_input():
    problem, theta = random_tabular_problem(0, 3, gamma=0.6, horizon=10)
    with pytest.raises(pydso.ProblemError, match="v must"):
        hessian_vector(problem, theta, {"logits": jnp.ones(9)}, key=jax.random.key(0), n=4)
    with pytest.raises(pydso.ProblemError, match="pathwise"):
        hessian_vector(problem, theta, theta, key=jax.random.key(0), n=4, method="pathwise")
    with pytest.raises(pydso.ProblemError, match="n must"):
        hessian_vector(problem, theta, theta, key=jax.random.key(0), n=1)
