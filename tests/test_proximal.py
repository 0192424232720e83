"""Proximal surrogate (pydso.estimators) and pydso.Proximal: exact first-order agreement with J, MC gradient,
improvement of tabular chains and of an LQR gain from a stored log."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from closed_form import double_integrator
from helpers import assert_tree_allclose, random_tabular_problem

import pydso
from pydso import estimators as op
from pydso import estimators as px
from pydso import exact

S, GAMMA, H = 4, 0.7, 50


@functools.lru_cache
def tabular(seed):
    return random_tabular_problem(seed, S, gamma=GAMMA, horizon=H)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_surrogate_gradient_equals_exact_gradient(seed):
    problem, theta = tabular(seed)
    g = jax.grad(px.tabular_surrogate, argnums=1)(problem, theta, theta)
    assert_tree_allclose(g, exact.gradient(problem, theta), rtol=1e-8, atol=1e-10)
    # its value at theta_k is sum_x rho(x) [L + gamma E V'] = rho . V
    value = float(exact.occupancy(problem, theta) @ exact.value(problem, theta))
    assert float(px.tabular_surrogate(problem, theta, theta)) == pytest.approx(value, rel=1e-10)
    # away from theta_k the gradient differs (the test can fail)
    other = jax.tree.map(lambda a: a + 0.5, theta)
    g_other = jax.grad(px.tabular_surrogate, argnums=1)(problem, other, theta)
    assert not np.allclose(g_other["logits"], exact.gradient(problem, other)["logits"], atol=1e-3)


def test_mc_surrogate_gradient_is_the_score_gradient():
    problem, theta = tabular(0)
    traj = pydso.rollout(problem, theta, key=jax.random.key(0), n=3000)
    sdata = px.prepare(problem, theta, op.as_batch(traj, problem))
    est = op.offpolicy_gradient(problem, theta, traj)
    exact_g = exact.gradient(problem, theta)
    for variant in ("clip", "kl", "plain"):
        g = jax.grad(px.surrogate, argnums=1)(problem, theta, sdata, variant=variant)
        assert_tree_allclose(g, est.gradient, rtol=1e-8, atol=1e-12)
    z = jax.tree.map(lambda a, s, e: np.abs(a - e) / s, est.gradient, est.stderr, exact_g)
    assert max(float(np.max(v)) for v in jax.tree.leaves(z)) < 4.0
    # pessimism: for minimisation the clipped and KL surrogates lie above the plain one
    moved = jax.tree.map(lambda a: a + 0.4 * jax.random.normal(jax.random.key(1), a.shape), theta)
    plain = float(px.surrogate(problem, moved, sdata, variant="plain"))
    assert float(px.surrogate(problem, moved, sdata, variant="clip")) > plain
    assert float(px.surrogate(problem, moved, sdata, variant="kl")) > plain
    # per-decision ratios: an unbiased estimate of J(theta) itself
    j_pd = float(px.surrogate(problem, moved, sdata, variant="plain", ratio="per_decision"))
    j_is, se = op.offpolicy_objective(problem, moved, traj)
    assert j_pd == pytest.approx(j_is, rel=1e-10)


def test_improve_on_tabular_lowers_exact_objective():
    problem, theta = tabular(1)
    traj = pydso.rollout(problem, theta, key=jax.random.key(2), n=2000)
    method = pydso.Proximal(epochs=10, minibatch=500, optimizer=optax.adam(0.05))
    result = pydso.optimize.improve(problem, theta, traj, key=jax.random.key(0), method=method)
    new = result.theta
    assert float(exact.objective(problem, new)) < float(exact.objective(problem, theta)) - 0.05
    assert result.history["ess"][0] == pytest.approx(2000.0)  # the data at theta_k
    assert result.history["ess_final"][0] < 2000.0


def test_offpolicy_improvement_from_stored_lqr_dataset(tmp_path):
    from pydso import data as pdata

    lqr = double_integrator(horizon=60)
    problem = lqr.problem()
    K_b = jnp.array([[0.3, 0.4]])  # a poor, stabilising gain
    traj = pydso.rollout(problem, K_b, key=jax.random.key(0), n=1000)
    pdata.save(pdata.to_dataset(traj, problem, K_b), tmp_path / "lqr.zarr")
    ds = pdata.open(tmp_path / "lqr.zarr")
    # three proximal steps from the same log (no new data): data reuse with IS weights, streamed by chunks
    method = pydso.Proximal(n=0, data=ds, epochs=15, minibatch=250, optimizer=optax.adam(0.03), episodes_per_chunk=500)
    result = pydso.minimize(problem, K_b, key=jax.random.key(0), steps=3, method=method)
    K = result.theta
    J_b, J_new, J_opt = (float(lqr.objective(k)) for k in (K_b, K, jnp.asarray(lqr.optimal_gain())))
    assert J_new < J_b - 0.2 * (J_b - J_opt), (J_b, J_new, J_opt)
    assert result.history["ess_final"][-1] < 1000.0
    assert result.history["ess"][0] == pytest.approx(1000.0)  # the log was recorded at K_b
