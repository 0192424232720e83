"""Natural gradient (pydso.estimators building blocks, pydso.NaturalGradient): CG with Fisher-vector products
and compatible features vs pydso.exact."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, random_tabular_problem
from jax.flatten_util import ravel_pytree

import pydso
from pydso import estimators as nat
from pydso import exact

S, GAMMA, H = 4, 0.7, 50


@functools.lru_cache
def tabular(seed):
    return random_tabular_problem(seed, S, gamma=GAMMA, horizon=H)


def exact_fvp(problem, theta):
    """F v over all (x, x') pairs weighted by rho(x) P(x'|x): the exact Fisher, by jvp/vjp."""
    P, _, _ = exact.chain(problem, theta)
    rho = exact.occupancy(problem, theta)
    x, xn = jnp.repeat(jnp.arange(S), S), jnp.tile(jnp.arange(S), S)
    return nat.fisher_vector_product(problem, theta, x, xn, (rho[:, None] * P).reshape(-1))


@pytest.mark.parametrize("seed", [0, 1])
def test_cg_with_exact_fvp_equals_exact_natural_gradient(seed):
    problem, theta = tabular(seed)
    fvp = exact_fvp(problem, theta)
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape), theta)
    F = exact.fisher(problem, theta)
    assert np.allclose(ravel_pytree(fvp(v))[0], F @ ravel_pytree(v)[0], rtol=1e-10, atol=1e-12)
    g = exact.gradient(problem, theta)
    for damping in (1e-3, 0.1):
        sol, info = nat.conjugate_gradient(fvp, g, damping=damping, iters=200, tol=1e-14)
        assert_tree_allclose(sol, exact.natural_gradient(problem, theta, damping=damping), rtol=1e-8, atol=1e-10)
    # the test can fail: the plain gradient is not the natural gradient
    assert not np.allclose(ravel_pytree(g)[0], ravel_pytree(sol)[0], rtol=0.1)


def test_compatible_features_and_cg_from_rollouts():
    problem, theta = tabular(0)
    traj = pydso.rollout(problem, theta, key=jax.random.key(0), n=4000)
    for damping in (0.0, 0.01):
        w, info = nat.compatible_natural_gradient(problem, theta, traj, damping=damping)
        ref = ravel_pytree(exact.natural_gradient(problem, theta, damping=damping))[0]
        fw = ravel_pytree(w)[0]
        assert float(jnp.linalg.norm(fw - ref) / jnp.linalg.norm(ref)) < 0.05
        assert float(fw @ ref / jnp.linalg.norm(fw) / jnp.linalg.norm(ref)) > 0.995
    # CG on the same empirical Fisher gives the same (damped) solution as the least squares
    direction, est, cg = nat.natural_gradient_direction(problem, theta, traj, damping=0.01, cg_iters=200)
    assert np.allclose(ravel_pytree(direction)[0], fw, rtol=1e-6, atol=1e-8)


def test_natural_gradient_steps_lower_exact_objective():
    problem, theta = tabular(1)
    # cost-only parameters are outside the range of F: the damping sets their step (1/damping times g)
    J = [float(exact.objective(problem, theta))]
    result = pydso.minimize(
        problem,
        theta,
        key=jax.random.key(10),
        steps=3,
        method=pydso.NaturalGradient(n=1000, damping=1.0, learning_rate=0.3),
        callback=lambda info: J.append(float(exact.objective(problem, info.theta))),
    )
    theta = result.theta
    assert J[-1] < J[0] - 0.1, J
    assert np.all(result.history["step_size"] == 0.3)
    traj = pydso.rollout(problem, theta, key=jax.random.key(13), n=1000)
    step_kl = pydso.NaturalGradient(damping=1e-2, learning_rate=None, max_kl=0.01)
    one = pydso.optimize.improve(problem, theta, traj, key=jax.random.key(0), method=step_kl)
    assert one.history["predicted_kl"][0] == pytest.approx(0.01, rel=1e-6)
