"""Average-cost value learning against pydso.exact on an ergodic tabular chain: differential values and average cost
by average-cost LSTD, the TD-advantage surrogate's gradient, and proximal / policy-iteration steps that improve the
exact average cost."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_tabular_problem

import pydso
from pydso import exact
from pydso.estimators import as_batch, fit_value_linear, prepare, surrogate
from pydso.optimize import td_discount

S, H, BURN, K = 4, 120, 20, 8


@functools.lru_cache(maxsize=1)
def _problem():
    """One problem object for the module, so that its compiled rollouts and exact references are shared."""
    base, theta = random_tabular_problem(3, S, average=True)
    problem = pydso.Problem(base.system, base.cost, pydso.AverageCost(H, BURN), base.initial, name="avg_tabular")
    return problem, theta


def features(x):
    return jax.nn.one_hot(x, S)


def _splits(batch, k):
    m = batch.n_episodes // k
    return [
        jax.tree.map(lambda a, i=i: a[i * m : (i + 1) * m] if a.ndim and a.shape[0] == batch.n_episodes else a, batch)
        for i in range(k)
    ]


@eqx.filter_jit
def _td_gradient(problem, theta, batch, V):
    """Gradient at theta_k of the surrogate with TD advantages of the differential critic V."""
    sdata = prepare(problem, theta, batch, advantage="td", value_fn=V, gamma=td_discount(problem))
    grad = jax.grad(surrogate, argnums=1)(problem, theta, sdata, variant="plain")
    return jax.flatten_util.ravel_pytree(grad)[0]


def test_differential_lstd_and_td_gradient_match_exact():
    problem, theta = _problem()
    traj = pydso.rollout(problem, theta, key=jax.random.key(0), n=400)
    batch = as_batch(traj, problem)
    pi = np.asarray(exact.occupancy(problem, theta))
    h_exact = np.asarray(exact.value(problem, theta))  # pi^T h = 0
    J_exact = float(exact.objective(problem, theta))
    g_exact = np.asarray(jax.flatten_util.ravel_pytree(exact.gradient(problem, theta))[0])
    hs, Js, gs = [], [], []
    for sub in _splits(batch, K):  # K independent fits: their spread is the sampling error
        V = fit_value_linear(problem, theta, sub, features)
        h = np.asarray(jax.vmap(V)(jnp.arange(S)))
        hs.append(h - pi @ h)  # the same normalisation as the exact h
        Js.append(float(V.average_cost))
        gs.append(np.asarray(_td_gradient(problem, theta, sub, V)))
    for est, ref, name in ((hs, h_exact, "h"), (Js, J_exact, "J"), (gs, g_exact, "gradient")):
        est = np.asarray(est)
        mean, se = est.mean(axis=0), est.std(axis=0, ddof=1) / np.sqrt(K)
        z = np.abs(mean - ref) / se
        print(name, "max |error| / s.e.:", float(np.max(z)), "max |error|:", float(np.max(np.abs(mean - ref))))
        assert np.all(z < 3.5), (name, mean, ref, se)
    # the differential values are informative, not just within a wide band
    assert np.max(np.abs(np.mean(hs, axis=0) - h_exact)) < 0.1 * np.max(np.abs(h_exact))


@pytest.mark.parametrize("improve", ["lookahead", "proximal"])
def test_policy_iteration_improves_the_exact_average_cost(improve):
    problem, theta = _problem()
    J0 = float(exact.objective(problem, theta))
    method = pydso.PolicyIteration(
        features=features,
        n=100,
        improve=improve,
        epochs=30 if improve == "lookahead" else 10,
        optimizer=optax.adam(0.1 if improve == "lookahead" else 0.05),
    )
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
        result = pydso.minimize(problem, theta, key=jax.random.key(1), steps=1, method=method, progress=False)
    J1 = float(exact.objective(problem, result.theta))
    print(f"{improve}: exact average cost {J0:.4f} -> {J1:.4f}")
    assert J1 < J0 - 0.02, (J0, J1)


def test_average_cost_fit_rejects_monte_carlo():
    problem, theta = _problem()
    with pytest.raises(pydso.ProblemError, match="td"):  # checked before the data are read
        fit_value_linear(problem, theta, None, features, method="mc")
