"""First exit (terminal sets, issue 10): the exact first-exit reference of :mod:`pydso.exact` on tabular chains
(discounted and gamma = 1), checked against the finite-horizon backward recursion at a long horizon and against the
score estimator; and ODE terminal sets through diffrax events, checked against closed forms of the exit time."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pydso
from pydso import exact

S = 5
_A = np.array(
    [
        [0.1, 0.8, -0.3, 0.2, -0.5],
        [-0.4, 0.3, 0.6, -0.1, 0.2],
        [0.5, -0.2, 0.1, 0.7, -0.3],
        [0.2, 0.4, -0.6, 0.0, 0.3],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)
_P0 = np.array([0.4, 0.3, 0.2, 0.1, 0.0])
THETA = jnp.array([0.4, -0.3, 0.8])


def _transition(theta):
    logits = jnp.asarray(_A) + theta[0] * jnp.asarray(_A.T) + theta[1] * jnp.eye(S)
    return jax.nn.softmax(logits, axis=1)


def _cost(x, theta):
    xf = x.astype(theta.dtype)
    return 1.0 + theta[2] * xf + 0.3 * jnp.cos(theta[0] * xf)


def _phi(x, theta):
    return theta[2] ** 2 * (x.astype(theta.dtype) - 2.0)


def _terminal(x):
    return x >= 3


def _problem(gamma, horizon=50, time_varying=False):
    system = (
        pydso.TabularChain(lambda t, th: _transition(th), time_varying=True)
        if time_varying
        else pydso.TabularChain(_transition)
    )
    setting = pydso.Episodic(gamma=gamma, horizon=horizon, terminal=_terminal)
    return pydso.Problem(system, _cost, setting, pydso.Categorical(_P0), _phi, name="exit")


def test_first_exit_exact_equals_long_finite_horizon_recursion():
    # Two code paths: the first-exit linear solve with gamma = 1 (killed terminal rows) and the time-indexed backward
    # recursion with absorption; they agree once non-absorption is negligible (P(alive at step 150) = 8e-32).
    inf, fin = _problem(1.0), _problem(1.0, horizon=150, time_varying=True)
    assert exact.is_finite_horizon(fin) and not exact.is_finite_horizon(inf)
    np.testing.assert_allclose(exact.objective(inf, THETA), exact.objective(fin, THETA), rtol=1e-12)
    np.testing.assert_allclose(exact.gradient(inf, THETA), exact.gradient(fin, THETA), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(exact.hessian(inf, THETA), exact.hessian(fin, THETA), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(exact.fisher(inf, THETA), exact.fisher(fin, THETA), rtol=1e-11, atol=1e-13)


def test_score_gradient_matches_first_exit_exact():
    problem = _problem(1.0, horizon=40)  # P(alive at step 40) = 5e-9
    est = pydso.score_gradient(problem, THETA, key=jax.random.key(0), n=2000)
    g = np.asarray(exact.gradient(problem, THETA))
    z = np.abs(np.asarray(est.gradient) - g) / np.asarray(est.stderr)
    assert np.all(z < 3), (est.gradient, g, est.stderr)
    J = float(exact.objective(problem, THETA))
    assert abs(float(est.objective) - J) < 3 * float(est.objective_stderr)


def test_gamma_one_without_sure_exit_is_an_error():
    def trapped(theta):  # states 0 and 1 form a closed class that never reaches the terminal state 2
        return jnp.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])

    problem = pydso.Problem(
        pydso.TabularChain(trapped),
        lambda x, th: jnp.asarray(1.0),
        pydso.Episodic(gamma=1.0, horizon=10, terminal=lambda x: x == 2),
        pydso.Categorical(jnp.array([0.5, 0.0, 0.5])),
    )
    with pytest.raises(pydso.ProblemError, match="probability 1"):
        exact.objective(problem, jnp.zeros(1))


# ------------------------------------------------------------------------------------------ ODE exits
def _ode_exit_problem(field, x0, condition, solver, terminal_cost=None, time_varying=False):
    cost = (lambda t, x, th: jnp.ones((), x.dtype)) if time_varying else (lambda x, th: jnp.ones((), x.dtype))
    return pydso.Problem(
        pydso.ODESystem(field, dt=0.05, solver=solver),
        cost,
        pydso.Episodic(gamma=1.0, horizon=20, terminal=condition),
        pydso.Fixed(jnp.array([x0])),
        terminal_cost,
        time_varying=time_varying,
    )


def test_ode_exit_time_constant_velocity_objective_and_gradient():
    # dx/dt = theta from 0, exit at x = 1, cost rate 1: J = 1/theta, dJ/dtheta = -1/theta^2.
    # Euler is exact for a constant field (and the cheapest to compile)
    problem = _ode_exit_problem(lambda t, x, th: th * jnp.ones_like(x), 0.0, lambda x: x[0] - 1.0, diffrax.Euler())
    theta = 1.3
    with pytest.raises(pydso.ProblemError, match="terminal set"):
        pydso.rollout(problem, theta, key=jax.random.key(0), n=1, backend=pydso.backends.JaxBackend("fastpath"))
    keys = jax.random.split(jax.random.key(0), 1)

    def objective(th):  # the simulated objective and the episode, differentiated in one compiled call
        traj = pydso.engine.rollout_chunk(problem, th, keys)
        return traj.objective[0], traj

    (J, traj), dJ = jax.jit(jax.value_and_grad(objective, has_aux=True))(theta)
    np.testing.assert_allclose(float(J), 1 / theta, rtol=1e-6)
    np.testing.assert_allclose(float(dJ), -1 / theta**2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(traj.states[0, -1]), [1.0], rtol=1e-9)  # held at the crossing state
    k = int(np.ceil(1 / theta / 0.05))
    assert bool(traj.alive[0, k - 1]) and not bool(traj.alive[0, k])
    np.testing.assert_allclose(float(jnp.sum(traj.costs[0, k:])), 0.0, atol=0)  # no cost after the exit


def test_ode_exit_time_linear_decay_with_time_varying_terminal_cost():
    # dx/dt = -theta x from 1, exit at x = 1/2: tau = ln 2 / theta; cost rate 1 and terminal cost Phi(t, x) = t at
    # the crossing give J = 2 tau, dJ/dtheta = -2 ln 2 / theta^2 (the crossing time moves with theta).
    problem = _ode_exit_problem(
        lambda t, x, th: -th * x,
        1.0,
        lambda t, x, th: x[0] - 0.5,
        diffrax.Tsit5(),
        terminal_cost=lambda t, x, th: t,
        time_varying=True,
    )
    theta = 0.9
    tau = np.log(2.0) / theta
    keys = jax.random.split(jax.random.key(0), 1)
    J, dJ = jax.jit(jax.value_and_grad(lambda th: pydso.engine.rollout_chunk(problem, th, keys).objective[0]))(theta)
    np.testing.assert_allclose(float(J), 2 * tau, rtol=1e-6)
    np.testing.assert_allclose(float(dJ), -2 * np.log(2.0) / theta**2, rtol=1e-6)
