"""Time-varying transitions and costs (issue 10): the one ``t`` mechanism of the whole package, the two systems it
brought (full-covariance :class:`pydso.GaussianChain`, :class:`pydso.ReparameterizedChain`), and the finite-horizon
exact reference of :mod:`pydso.exact` (backward recursion), checked against brute-force enumeration of every path
and against the score estimator.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

import pydso
from pydso import exact


# ------------------------------------------------------------------------------------------ new systems
def test_gaussian_chain_full_covariance_log_prob_matches_scipy():
    L = np.array([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-0.3, 0.2, 0.7]])
    chain = pydso.GaussianChain(lambda x, th: th * jnp.tanh(x), scale_tril=L)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, x_next = rng.normal(size=3), rng.normal(size=3)
        ref = multivariate_normal(0.7 * np.tanh(x), L @ L.T).logpdf(x_next)
        got = chain.log_prob(0.0, jnp.asarray(x), jnp.asarray(x_next), 0.7)
        np.testing.assert_allclose(float(got), ref, rtol=1e-12)


def test_gaussian_chain_callable_time_varying_tril_samples_with_its_covariance():
    # x' = L_t eps with L_t = (1 + t) L: the sample covariance at t = 1 is 4 L L^T.
    L = jnp.array([[1.0, 0.0], [0.6, 0.5]])
    chain = pydso.GaussianChain(
        lambda t, x, th: jnp.zeros(2), scale_tril=lambda t, x, th: (1.0 + t) * L, time_varying=True
    )
    keys = jax.random.split(jax.random.key(1), 20000)
    xs = jax.vmap(lambda k: chain.sample(k, 1.0, jnp.zeros(2), 0.0))(keys)
    np.testing.assert_allclose(np.cov(np.asarray(xs).T), 4 * np.asarray(L @ L.T), atol=0.12)
    ref = multivariate_normal(np.zeros(2), 4 * np.asarray(L @ L.T)).logpdf([0.3, -0.1])
    np.testing.assert_allclose(float(chain.log_prob(1.0, jnp.zeros(2), jnp.array([0.3, -0.1]), 0.0)), ref)


def test_gaussian_chain_scale_and_scale_tril_are_exclusive():
    with pytest.raises(pydso.ProblemError, match="scale_tril"):
        pydso.GaussianChain(lambda x, th: x, 2.0, scale_tril=jnp.eye(2))
    with pytest.raises(pydso.ProblemError, match="scale_tril.*positive diagonal"):
        pydso.GaussianChain(lambda x, th: x, scale_tril=jnp.array([[1.0, 0.0], [0.0, -1.0]]))


def _reparam_problem():
    chain = pydso.ReparameterizedChain(lambda key, x, th: th * x + 0.1 * jax.random.normal(key, x.shape))
    return pydso.Problem(chain, lambda x, th: jnp.sum(x**2), pydso.FiniteHorizon(3), pydso.Fixed(jnp.array([1.0])))


def test_reparameterized_chain_pathwise_matches_closed_form_and_score_refuses():
    problem = _reparam_problem()

    # E sum_{t<3} x_t^2 with x_{t+1} = a x_t + 0.1 eps: m_t = E x_t^2 = a^2 m_{t-1} + 0.01.
    def J(a):
        m, tot = 1.0, 1.0
        for _ in range(2):
            m = a**2 * m + 0.01
            tot = tot + m
        return tot

    est = pydso.pathwise_gradient(problem, 0.8, key=jax.random.key(0), n=4000)
    assert abs(float(est.objective) - J(0.8)) < 3 * float(est.objective_stderr)
    assert abs(float(est.gradient) - float(jax.grad(J)(0.8))) < 3 * float(est.stderr)
    with pytest.raises(pydso.ProblemError, match="has no transition log-density; use Pathwise"):
        pydso.score_gradient(problem, 0.8, key=jax.random.key(0), n=8)
    with pytest.raises(pydso.ProblemError, match="has no transition log-density; use Pathwise"):
        pydso.Score().estimate(problem, 0.8, key=jax.random.key(0), n=8)


# ------------------------------------------------------------------------------------------ tabular, exact
S, T = 3, 4
_A = np.array([[0.2, -0.4, 0.1], [0.5, 0.0, -0.3], [-0.2, 0.3, 0.4]])
_B = np.array([[0.0, 0.7, -0.5], [-0.6, 0.2, 0.3], [0.4, -0.1, 0.0]])
_P0 = np.array([0.5, 0.3, 0.2])


def _transition(t, theta):
    logits = jnp.asarray(_A) * (1.0 + 0.3 * t) + theta[0] * jnp.asarray(_B) + theta[1] * t * jnp.asarray(_B.T)
    return jax.nn.softmax(logits, axis=1)


def _cost(t, x, theta):
    xf = x.astype(theta.dtype)
    return theta[2] * (xf + 1.0) * (1.0 + 0.5 * t) + jnp.sin(theta[0] * xf)


def _terminal_cost(t, x, theta):
    return theta[1] ** 2 * x.astype(theta.dtype) + 0.1 * t


def _problem(setting, terminal_cost=True):
    return pydso.Problem(
        pydso.TabularChain(_transition, time_varying=True),
        _cost,
        setting,
        pydso.Categorical(_P0),
        _terminal_cost if terminal_cost else None,
        time_varying=True,
        name="tv",
    )


SETTINGS = {
    "finite": pydso.FiniteHorizon(T),  # w_t = 1
    "exit": pydso.Episodic(gamma=0.9, horizon=T, terminal=lambda x: x == 2),  # w_t = gamma^t, absorption
}
THETA = jnp.array([0.3, -0.7, 1.1])


def _paths(setting):
    """Every path of T steps (rollout semantics: a path absorbed at step k is frozen there, counted once), as
    ``(paths (N, T+1), k (N,))`` with ``k`` the absorption step (T if never)."""
    terminal = setting.terminal_set()
    is_term = (lambda x: bool(terminal(x))) if terminal is not None else (lambda x: False)
    paths, ks = [], []
    for path in itertools.product(range(S), repeat=T + 1):
        k = next((j for j in range(T + 1) if is_term(path[j])), T)
        if all(path[j] == path[k] for j in range(k + 1, T + 1)):
            paths.append(path)
            ks.append(k)
    return np.array(paths), np.array(ks)


def _brute_force(setting, theta):
    """J, and the Fisher matrix sum_t c_t E[s_t s_t^T 1{alive at t}], summed over every path (vectorised over
    paths; independent of pydso.exact's recursion)."""
    paths, ks = _paths(setting)
    w, w_end = setting.weights()
    w_full = jnp.asarray(np.append(w, w_end))
    occ = jnp.asarray(setting.gamma ** np.arange(T) if isinstance(setting, pydso.Episodic) else np.ones(T))
    live = jnp.asarray(np.arange(T)[None, :] < ks[:, None])  # (N, T): step t is taken (before absorption)
    ts = jnp.arange(T + 1, dtype=float)

    def J(theta):
        Ps = jax.vmap(lambda t: _transition(t, theta))(ts[:-1])  # (T, S, S)
        step_p = Ps[jnp.arange(T)[None, :], paths[:, :-1], paths[:, 1:]]  # (N, T)
        prob = jnp.asarray(_P0)[paths[:, 0]] * jnp.prod(jnp.where(live, step_p, 1.0), axis=1)
        L = jax.vmap(jax.vmap(_cost, in_axes=(0, 0, None)), in_axes=(None, 0, None))(
            ts[:-1], jnp.asarray(paths[:, :-1]), theta
        )
        x_end = jnp.asarray(paths[np.arange(len(ks)), ks])
        phi = jax.vmap(_terminal_cost, in_axes=(0, 0, None))(ts[ks], x_end, theta)
        cost = jnp.sum(jnp.where(live, w_full[:-1] * L, 0.0), axis=1) + w_full[ks] * phi
        return jnp.sum(prob * cost), prob

    @jax.jit
    def fisher(theta):
        _, prob = J(theta)
        dlogP = jax.jacobian(lambda th: jnp.log(jax.vmap(lambda t: _transition(t, th))(ts[:-1])))(theta)
        s = dlogP[jnp.arange(T)[None, :], paths[:, :-1], paths[:, 1:]]  # (N, T, p)
        return jnp.einsum("n,nt,t,ntp,ntq->pq", prob, live.astype(float), occ, s, s)

    objective = lambda th: J(th)[0]  # noqa: E731
    return jax.jit(objective), jax.jit(jax.grad(objective)), jax.jit(jax.hessian(objective)), fisher(theta)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_finite_horizon_exact_matches_enumeration_of_all_paths(name):
    setting = SETTINGS[name]
    problem = _problem(setting)
    J_bf, grad_bf, hess_bf, F_bf = _brute_force(setting, THETA)
    np.testing.assert_allclose(float(exact.objective(problem, THETA)), float(J_bf(THETA)), rtol=1e-12)
    np.testing.assert_allclose(exact.gradient(problem, THETA), grad_bf(THETA), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(exact.hessian(problem, THETA), hess_bf(THETA), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(exact.fisher(problem, THETA), F_bf, rtol=1e-12, atol=1e-13)
    # the value recursion: V_0 averaged over p0 is J; V_T = w_T Phi_T
    V = exact.value(problem, THETA)
    assert V.shape == (T + 1, S)
    np.testing.assert_allclose(float(_P0 @ V[0]), float(J_bf(THETA)), rtol=1e-12)


def test_score_gradient_matches_finite_horizon_exact():
    problem = _problem(SETTINGS["finite"])
    est = pydso.score_gradient(problem, THETA, key=jax.random.key(3), n=6000)
    g = exact.gradient(problem, THETA)
    z = np.abs(np.asarray(est.gradient) - np.asarray(g)) / np.asarray(est.stderr)
    assert np.all(z < 3), (est.gradient, g, est.stderr)
    assert abs(float(est.objective) - float(exact.objective(problem, THETA))) < 3 * float(est.objective_stderr)


# ------------------------------------------------------------------------------------------ continuous time
@pytest.mark.parametrize("integrator", ["fastpath", "diffrax"])
def test_ode_costs_receive_the_solver_time(integrator):
    # dx/dt = theta from 0 on [0, H dt]; cost(t, x) = t integrates to (t_{k+1}^2 - t_k^2)/2 per step, and the
    # terminal cost Phi(t, x) = t x at t_H = H dt is theta (H dt)^2.
    dt, H, theta = 0.1, 5, 0.7
    problem = pydso.Problem(
        pydso.ODESystem(lambda t, x, th: th * jnp.ones_like(x), dt=dt),
        lambda t, x, th: t,
        pydso.FiniteHorizon(H),
        pydso.Fixed(jnp.zeros(1)),
        lambda t, x, th: t * x[0],
        time_varying=True,
    )
    traj = pydso.rollout(problem, theta, key=jax.random.key(0), n=1, backend=pydso.backends.JaxBackend(integrator))
    ts = dt * np.arange(H + 1)
    np.testing.assert_allclose(np.asarray(traj.costs[0]), np.diff(ts**2) / 2, rtol=1e-12)
    np.testing.assert_allclose(float(traj.terminal_costs[0]), theta * (H * dt) ** 2, rtol=1e-12)


def test_sde_step_costs_use_the_left_point_time():
    # Euler-Maruyama rule: step k costs L(t_k) dt = k dt^2 for cost(t, x) = t (the fast path).
    dt, H = 0.1, 5
    problem = pydso.Problem(
        pydso.SDESystem(lambda t, x, th: -x, lambda t, x, th: th * jnp.ones_like(x), dt=dt),
        lambda t, x, th: t,
        pydso.FiniteHorizon(H),
        pydso.Fixed(jnp.zeros(1)),
        time_varying=True,
    )
    traj = pydso.rollout(problem, 0.3, key=jax.random.key(0), n=2)
    np.testing.assert_allclose(np.asarray(traj.costs), np.tile(dt**2 * np.arange(H), (2, 1)), rtol=1e-12)
