"""Tests of the tabular reference :mod:`pydso.exact`.

Every formula is checked against quantities computed another way: autodiff through the closed-form linear
solves, Richardson-extrapolated central finite differences, power series of the chain, the classic policy
gradient theorem. All quantities of one random problem are computed in one compiled call (module-scoped
fixture) to keep compile time low.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, random_tabular_problem
from jax.flatten_util import ravel_pytree

import pydso
from pydso import exact

# (S, gamma or None for AverageCost)
CASES = [(2, 0.9), (5, 0.99), (12, 0.99), (5, None), (12, None)]
IDS = [f"S{S}-{'average' if g is None else f'gamma{g}'}" for S, g in CASES]

FD_STEP = 1e-2  # Richardson-extrapolated central differences: error O(h^4) ~ 1e-11 relative
DAMPING = 1e-3


def _richardson_fd(fun, x, h):
    """(4 D(h/2) - D(h)) / 3 with D the central difference; all 4p evaluations in one vmap."""
    p = x.size
    eye = jnp.eye(p, dtype=x.dtype)

    def central(step):
        vals = jax.vmap(fun)(jnp.concatenate([x + step * eye, x - step * eye]))
        return (vals[:p] - vals[p:]) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


@eqx.filter_jit
def _everything(problem, theta):
    flat, unravel = ravel_pytree(theta)
    J_flat = lambda f: exact.objective(problem, unravel(f))
    P, L, p0 = exact.chain(problem, theta)
    w = exact.occupancy(problem, theta)

    def weighted_kl(f_new):
        logp_new = jnp.log(problem.system.transition_fn(unravel(f_new)))
        return jnp.sum(w[:, None] * P * (jnp.log(P) - logp_new))

    return dict(
        P=P,
        L=L,
        p0=p0,
        V=exact.value(problem, theta),
        J=exact.objective(problem, theta),
        occupancy=w,
        grad=exact.gradient(problem, theta),
        autograd=jax.grad(lambda t: exact.objective(problem, t))(theta),
        fd=unravel(_richardson_fd(J_flat, flat, FD_STEP)),
        hess=exact.hessian(problem, theta),
        autohess=jax.hessian(J_flat)(flat),
        dV=exact.value_gradient(problem, theta),
        autodV=jax.jacobian(lambda f: exact.value(problem, unravel(f)))(flat),
        fisher=exact.fisher(problem, theta),
        klhess=jax.hessian(weighted_kl)(flat),
        natgrad=exact.natural_gradient(problem, theta, damping=DAMPING),
    )


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    S, gamma = request.param
    problem, theta = random_tabular_problem(100 + S, S, gamma=gamma or 0.9, average=gamma is None)
    # One XLA compilation per case; backend optimisation off: the run is tiny, the compile is what costs.
    compiled = _everything.lower(problem, theta).compile(compiler_options={"xla_backend_optimization_level": 0})
    return problem, theta, gamma, jax.tree.map(np.asarray, compiled(problem, theta))


def _scale(tree):
    return max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------- derivatives
def test_gradient_matches_autodiff(case):
    _, theta, _, r = case
    assert jax.tree.structure(r["grad"]) == jax.tree.structure(theta)
    assert_tree_allclose(r["grad"], r["autograd"], rtol=1e-10, atol=1e-12 * _scale(r["autograd"]))


def test_gradient_matches_finite_differences(case):
    _, _, _, r = case
    assert_tree_allclose(r["grad"], r["fd"], rtol=1e-7, atol=1e-9 * _scale(r["grad"]))


def test_hessian_matches_autodiff(case):
    _, theta, _, r = case
    p = ravel_pytree(theta)[0].size
    assert r["hess"].shape == (p, p)
    assert_tree_allclose(r["hess"], r["autohess"], rtol=1e-8, atol=1e-10 * _scale(r["autohess"]))


def test_value_gradient_matches_autodiff(case):
    _, theta, _, r = case
    assert r["dV"].shape == (r["P"].shape[0], ravel_pytree(theta)[0].size)
    assert_tree_allclose(r["dV"], r["autodV"], rtol=1e-9, atol=1e-11 * _scale(r["autodV"]))


def test_fisher_is_weighted_kl_hessian_and_psd(case):
    _, _, _, r = case
    F = r["fisher"]
    assert_tree_allclose(F, r["klhess"], rtol=1e-8, atol=1e-11 * _scale(F))
    np.testing.assert_allclose(F, F.T, atol=1e-14 * _scale(F))
    eig = np.linalg.eigvalsh(F)
    assert eig.min() >= -1e-10 * eig.max()
    assert eig.max() > 0


def test_natural_gradient_solves_damped_fisher_system(case):
    _, theta, _, r = case
    ng = r["natgrad"]
    assert jax.tree.structure(ng) == jax.tree.structure(theta)
    lhs = (r["fisher"] + DAMPING * np.eye(r["fisher"].shape[0])) @ ravel_pytree(ng)[0]
    g = ravel_pytree(r["grad"])[0]
    np.testing.assert_allclose(lhs, g, rtol=1e-7, atol=1e-9 * np.abs(g).max())


# --------------------------------------------------------------------------------------------- closed forms
def test_value_satisfies_bellman_equation(case):
    _, _, gamma, r = case
    P, L, V, J = r["P"], r["L"], r["V"], r["J"]
    tol = 1e-11 * (np.abs(V).max() + np.abs(L).max())
    if gamma is None:  # h + J = L + P h, pi^T h = 0
        np.testing.assert_allclose(V + J, L + P @ V, atol=tol)
        assert abs(r["occupancy"] @ V) < tol
    else:
        np.testing.assert_allclose(V, L + gamma * P @ V, atol=tol)
        np.testing.assert_allclose(J, r["p0"] @ V, rtol=1e-12)


def test_occupancy(case):
    _, _, gamma, r = case
    P, w = r["P"], r["occupancy"]
    if gamma is None:
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(w @ P, w, atol=1e-13)
        np.testing.assert_allclose(exact.stationary(P), w, atol=1e-13)
        np.testing.assert_allclose(r["J"], w @ r["L"], rtol=1e-12)
    else:
        np.testing.assert_allclose(w.sum(), 1.0 / (1.0 - gamma), rtol=1e-11)
        # rho^T = p0^T + gamma rho^T P, and J = rho^T L
        np.testing.assert_allclose(w, r["p0"] + gamma * w @ P, atol=1e-11 * w.max())
        np.testing.assert_allclose(r["J"], w @ r["L"], rtol=1e-11)
    assert np.all(w > 0)


def _power_sum(M, T):
    """sum_{t<T} M^t by binary doubling (sum_{t<2n} = sum_{t<n} + M^n sum_{t<n}); plain products, no solves."""
    S = M.shape[0]
    total, power, block = np.zeros((S, S)), np.array(M), np.eye(S)  # n = 1: block = sum_{t<n} M^t, power = M^n
    offset = np.eye(S)  # M^(bits consumed so far)
    while T:
        if T & 1:
            total = total + offset @ block
            offset = offset @ power
        block, power = block + power @ block, power @ power
        T >>= 1
    return total


def test_objective_equals_power_series(case):
    _, _, gamma, r = case
    P, L, p0, J = r["P"], r["L"], r["p0"], r["J"]
    if gamma is not None:
        T = int(np.ceil(np.log(1e-18) / np.log(gamma)))  # truncation below 1e-16 relative
        series = p0 @ _power_sum(gamma * P, T) @ L
        np.testing.assert_allclose(series, J, rtol=1e-11)
    else:
        # Cesaro average: (1/T) sum_{t<T} p0^T P^t L = J + p0^T (I - P^T) h / T exactly, and -> J as T -> inf.
        h = r["V"]
        for T in (1, 10, 1000, 100_000):
            avg = p0 @ _power_sum(P, T) @ L / T
            correction = (p0 @ h - p0 @ np.linalg.matrix_power(P, T) @ h) / T
            np.testing.assert_allclose(avg, J + correction, rtol=1e-10, atol=1e-10)
        assert abs(avg - J) < 1e-3 * max(1.0, abs(J))


# --------------------------------------------------------------------------------------------- MDPs
@functools.cache
def _mdp_case(S, A, gamma):
    """A random MDP, softmax policy logits theta, and its DSO problem (cached: compiled once per case)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(10 * S + A), 4)
    p = jax.nn.softmax(2.0 * jax.random.normal(k1, (S, A, S)), axis=-1)
    c = jax.random.uniform(k2, (S, A), minval=-1.0, maxval=1.0)
    p0 = jax.random.dirichlet(k3, jnp.ones(S))
    p0 = p0 / p0.sum()
    theta = jax.random.normal(k4, (S * A,))

    def policy_fn(th):
        return jax.nn.softmax(th.reshape(S, A), axis=1)

    problem = exact.mdp_problem(policy_fn, p, c, p0, pydso.Episodic(gamma=gamma))
    return policy_fn, p, c, p0, theta, problem


@pytest.mark.parametrize("S, A, gamma", [(3, 2, 0.9), (6, 4, 0.99)])
def test_mdp_gradient_equals_policy_gradient_theorem(S, A, gamma):
    policy_fn, p, c, p0, theta, problem = _mdp_case(S, A, gamma)
    P, L, _ = exact.chain(problem, theta)
    pol = np.asarray(policy_fn(theta))
    np.testing.assert_allclose(P, np.einsum("sa,sat->st", pol, p), rtol=1e-14)
    np.testing.assert_allclose(L, np.sum(pol * np.asarray(c), axis=1), rtol=1e-14)
    dso = exact.gradient(problem, theta)
    pgt = exact.policy_gradient_theorem(policy_fn, p, c, p0, gamma, theta)
    assert_tree_allclose(dso, pgt, rtol=1e-10, atol=1e-12 * _scale(pgt))


def test_natural_gradient_without_damping_solves_fisher_system():
    # Softmax logits: F is singular (row shifts) but grad J lies in its range, so F ng = grad J exactly.
    *_, theta, problem = _mdp_case(3, 2, 0.9)
    F = exact.fisher(problem, theta)
    g = exact.gradient(problem, theta)
    ng = exact.natural_gradient(problem, theta)
    np.testing.assert_allclose(F @ ng, g, rtol=1e-8, atol=1e-10 * np.abs(g).max())
    assert np.linalg.matrix_rank(np.asarray(F)) < F.shape[0]


# --------------------------------------------------------------------------------------------- bad input
def _softmax_problem(P_fn, setting, name):
    return pydso.Problem(
        pydso.TabularChain(P_fn), lambda x, th: 1.0 * x, setting, pydso.Categorical([0.5, 0.5]), name=name
    )


def test_rejects_non_tabular_problem():
    problem = pydso.Problem(
        pydso.GaussianChain(lambda x, th: th * x), lambda x, th: x**2, pydso.Episodic(), pydso.Fixed(1.0), name="lqr"
    )
    with pytest.raises(pydso.ProblemError, match=r"problem 'lqr'.*TabularChain"):
        exact.gradient(problem, 0.5)


def test_rejects_non_stochastic_matrix():
    rows = _softmax_problem(lambda th: jnp.array([[0.5, 0.6], [0.3, 0.7]]), pydso.Episodic(0.9), "rows")
    with pytest.raises(pydso.ProblemError, match=r"problem 'rows'.*not row-stochastic.*row 0 sums"):
        exact.objective(rows, 0.0)
    neg = _softmax_problem(lambda th: jnp.array([[1.2, -0.2], [0.3, 0.7]]), pydso.Episodic(0.9), "neg")
    with pytest.raises(pydso.ProblemError, match=r"problem 'neg'.*negative entries"):
        exact.value(neg, 0.0)
    with pytest.raises(pydso.ProblemError, match="not row-stochastic"):
        exact.stationary(jnp.array([[0.5, 0.6], [0.3, 0.7]]))


def test_rejects_gamma_one_episodic():
    problem = _softmax_problem(lambda th: jnp.full((2, 2), 0.5), pydso.Episodic(gamma=1.0), "undiscounted")
    with pytest.raises(pydso.ProblemError, match=r"problem 'undiscounted'.*gamma = 1.*singular.*terminal"):
        exact.objective(problem, 0.0)


def test_rejects_non_ergodic_average_cost():
    problem = _softmax_problem(lambda th: jnp.eye(2), pydso.AverageCost(), "two_classes")
    with pytest.raises(pydso.ProblemError, match=r"problem 'two_classes'.*not ergodic.*singular"):
        exact.objective(problem, 0.0)
    with pytest.raises(pydso.ProblemError, match="not ergodic"):
        exact.stationary(jnp.eye(3))


def test_finite_horizon_and_terminal_sets_supported_unsupported_settings_rejected():
    # FiniteHorizon and terminal sets are modelled (tests/test_time_varying.py, tests/test_first_exit.py check the
    # numbers); here: the value recursion's shape and V_T = Phi = 0, and the settings that are still refused.
    P_fn = lambda th: jnp.full((2, 2), 0.5)
    cost = lambda x, th: 1.0 + x.astype(float)
    finite = pydso.Problem(pydso.TabularChain(P_fn), cost, pydso.FiniteHorizon(10), pydso.Categorical([0.5, 0.5]))
    V = exact.value(finite, 0.0)
    assert V.shape == (11, 2) and float(jnp.abs(V[-1]).max()) == 0.0
    np.testing.assert_allclose(V[0], 1.0 + np.arange(2) + 9 * 1.5, rtol=1e-14)
    no_exit = pydso.Problem(
        pydso.TabularChain(P_fn), cost, pydso.Episodic(1.0), pydso.Categorical([0.5, 0.5]), name="noexit"
    )
    with pytest.raises(pydso.ProblemError, match=r"problem 'noexit'.*gamma < 1 or a terminal set"):
        exact.gradient(no_exit, 0.0)
    wrong_p0 = pydso.Problem(
        pydso.TabularChain(lambda th: jnp.full((3, 3), 1 / 3)),
        lambda x, th: 1.0,
        pydso.Episodic(0.9),
        pydso.Categorical([0.5, 0.5]),
        name="p0",
    )
    with pytest.raises(pydso.ProblemError, match=r"problem 'p0'.*2 states.*3"):
        exact.chain(wrong_p0, 0.0)


def test_checks_periodic_chain_is_accepted():
    # An irreducible periodic chain is ergodic in the average-cost sense: pi is unique.
    pi = exact.stationary(jnp.array([[0.0, 1.0], [1.0, 0.0]]))
    np.testing.assert_allclose(pi, [0.5, 0.5], rtol=1e-14)


# --------------------------------------------------------------------------------------------- helpers
def test_assert_tree_allclose_reports_worst_leaf():
    a = {"x": np.ones(3), "y": np.array([1.0, 2.0])}
    assert_tree_allclose(a, {"x": np.ones(3) * (1 + 1e-9), "y": np.array([1.0, 2.0])}, rtol=1e-8)
    with pytest.raises(AssertionError, match=r"worst leaf \['y'\]"):
        assert_tree_allclose(a, {"x": np.ones(3) * (1 + 1e-9), "y": np.array([1.0, 2.1])}, rtol=1e-8)
    with pytest.raises(AssertionError, match="structures differ"):
        assert_tree_allclose(a, {"x": np.ones(3)}, rtol=1e-8)
