r"""Backend conformance: what every :class:`pydso.backends.AbstractBackend` must get right, checked against
closed forms and finite differences, parametrised over the available backends.

The JAX backend runs always. The Julia backend runs where juliacall finds a working Julia; elsewhere (pydso's CI
among them) its parameter is skipped with the reason :func:`pydso.backends.julia.julia_unavailable_reason` gives.

The reference problem is the damped rotation :math:`\dot x = A x`, :math:`A = \begin{pmatrix}-a & w\\ -w & -a
\end{pmatrix}`, :math:`\theta = (a, w)`: :math:`x(t) = e^{-at} R(wt) x_0`, and with the running cost
:math:`L = x^\top x` the interval costs are :math:`|x_0|^2 (e^{-2a t_k} - e^{-2a t_{k+1}}) / (2a)`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pydso
from pydso.backends import get_backend
from pydso.backends.julia import julia_unavailable_reason

_JULIA_REASON = julia_unavailable_reason()
BACKENDS = [
    pytest.param("jax", id="jax"),
    pytest.param(
        "julia",
        id="julia",
        marks=pytest.mark.skipif(
            _JULIA_REASON is not None, reason=f"the Julia backend is not available here: {_JULIA_REASON}"
        ),
    ),
]

DT, H, GAMMA = 0.05, 20, 0.9
THETA = jnp.array([0.4, 1.3])  # (a, w)
X0 = jnp.array([1.0, -0.5])


def rotation(t, x, theta):
    a, w = theta[0], theta[1]
    return jnp.stack([-a * x[0] + w * x[1], -w * x[0] - a * x[1]])


def rotation_problem(initial=None):
    return pydso.Problem(
        pydso.ODESystem(rotation, dt=DT),
        lambda x, theta: x @ x,
        pydso.Episodic(GAMMA, H),
        pydso.Fixed(X0) if initial is None else initial,
        terminal_cost=lambda x, theta: 2.0 * (x @ x),
        name="damped_rotation",
    )


def closed_form(theta, x0):
    a, w = float(theta[0]), float(theta[1])
    ts = np.arange(H + 1) * DT
    c, s = np.cos(w * ts), np.sin(w * ts)
    x0 = np.asarray(x0)
    states = np.exp(-a * ts)[:, None] * np.stack([c * x0[0] + s * x0[1], -s * x0[0] + c * x0[1]], axis=1)
    e = np.exp(-2 * a * ts)
    costs = (x0 @ x0) * (e[:-1] - e[1:]) / (2 * a)
    return states, costs


def objective_closed_form(a):
    """J(a) for the fixed start X0 (independent of w: a rotation keeps |x|)."""
    ts = np.arange(H + 1) * DT
    r2 = float(X0 @ X0)
    e = np.exp(-2 * a * ts)
    return np.sum(GAMMA ** np.arange(H) * r2 * (e[:-1] - e[1:]) / (2 * a)) + GAMMA**H * 2.0 * r2 * e[-1]


def objective(backend, problem, theta, keys):
    b = backend.simulate(problem, theta, keys)
    w, w_end = problem.setting.weights()
    return jnp.mean(b.costs @ jnp.asarray(w) + b.terminal_weights * b.terminal_costs), b


def central_differences(f, theta, eps):
    return np.array([(f(theta.at[i].add(eps))[0] - f(theta.at[i].add(-eps))[0]) / (2 * eps) for i in range(2)])


@pytest.mark.parametrize("name", BACKENDS)
def test_states_running_costs_and_ensemble_shapes(name):
    """Every episode of a rollout solves the closed form from its own start, at the save times; the batch has the
    documented shapes; an episode depends on its own key only."""
    backend = get_backend(name)
    problem = rotation_problem(pydso.Normal(jnp.zeros(2), 1.0))
    n = 4
    traj = pydso.rollout(problem, THETA, key=jax.random.key(0), n=n, backend=name)
    assert traj.states.shape == (n, H + 1, 2)
    assert traj.costs.shape == traj.log_probs.shape == (n, H)
    assert traj.alive.shape == (n, H + 1) and bool(jnp.all(traj.alive))
    assert traj.terminal_costs.shape == traj.terminal_weights.shape == (n,)
    assert len({float(x) for x in traj.states[:, 0, 0]}) == n
    for i in range(n):
        states, costs = closed_form(THETA, traj.states[i, 0])
        np.testing.assert_allclose(traj.states[i], states, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(traj.costs[i], costs, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(traj.terminal_costs[i], 2.0 * np.sum(states[-1] ** 2), rtol=1e-7)
    np.testing.assert_allclose(traj.terminal_weights, GAMMA**H, rtol=1e-12)
    keys = pydso.engine.episode_keys(jax.random.key(0), n)
    part = jax.jit(lambda k: backend.simulate(problem, THETA, k))(keys[1:3])
    np.testing.assert_allclose(part.states, traj.states[1:3], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", BACKENDS)
def test_pathwise_gradient_against_finite_differences_and_closed_form(name):
    backend = get_backend(name)
    problem = rotation_problem()
    keys = jax.random.split(jax.random.key(1), 2)
    f = jax.jit(jax.value_and_grad(lambda th: objective(backend, problem, th, keys), has_aux=True))
    (value, _), grad = f(THETA)
    a = float(THETA[0])
    np.testing.assert_allclose(value, objective_closed_form(a), rtol=1e-7)
    np.testing.assert_allclose(grad, central_differences(lambda th: f(th)[0], THETA, 1e-5), rtol=1e-6, atol=1e-8)
    exact_da = (objective_closed_form(a + 1e-6) - objective_closed_form(a - 1e-6)) / 2e-6
    np.testing.assert_allclose(grad, [exact_da, 0.0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", BACKENDS)
def test_sde_mean_and_pathwise_gradient(name):
    r"""Ornstein–Uhlenbeck :math:`dx = -k x\,dt + s\,dW` under Euler–Maruyama: :math:`E[x_H] = (1 - k\,dt)^H x_0`
    exactly, within 4 standard errors; the first interval's cost is :math:`L(x_0)\,dt`; the pathwise gradient of
    the (fixed-key) objective matches finite differences."""
    backend = get_backend(name)
    k, s, x0, dt, horizon, n = 1.5, 0.4, 1.0, 0.05, 10, 1000
    problem = pydso.Problem(
        pydso.SDESystem(lambda t, x, th: -th[0] * x, lambda t, x, th: th[1], dt=dt),
        lambda x, th: jnp.sum(x**2),
        pydso.FiniteHorizon(horizon),
        pydso.Fixed(jnp.array([x0])),
    )
    theta = jnp.array([k, s])
    keys = jax.random.split(jax.random.key(3), n)
    f = jax.jit(jax.value_and_grad(lambda th: objective(backend, problem, th, keys), has_aux=True))
    (_, b), grad = f(theta)
    assert b.states.shape == (n, horizon + 1, 1)
    end = np.asarray(b.states[:, -1, 0])
    assert abs(end.mean() - (1 - k * dt) ** horizon * x0) < 4 * end.std() / np.sqrt(n)
    np.testing.assert_allclose(b.costs[:, 0], dt * x0**2, rtol=1e-12)
    np.testing.assert_allclose(grad, central_differences(lambda th: f(th)[0], theta, 1e-6), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_input_raises_problem_errors(name):
    problem = rotation_problem()
    with pytest.raises(pydso.ProblemError, match="theta"):
        pydso.rollout(problem, jnp.array([0.4, jnp.nan]), key=jax.random.key(0), n=2, backend=name)
    with pytest.raises(pydso.ProblemError):
        pydso.rollout(problem, {"a": 0.4}, key=jax.random.key(0), n=2, backend=name)
    with pytest.raises(pydso.ProblemError, match="key"):
        pydso.rollout(problem, THETA, key=0, n=2, backend=name)
    with pytest.raises(pydso.ProblemError, match="n"):
        pydso.rollout(problem, THETA, key=jax.random.key(0), n=0, backend=name)


def test_selecting_julia_without_julia_raises_one_clear_error(monkeypatch, tmp_path):
    """Without juliacall, or with juliacall but no Julia executable, ``backend="julia"`` raises one ProblemError
    saying what to install — checked before juliacall is imported (it would try to download Julia)."""
    # a juliacall that must never be imported: importing it raises
    (tmp_path / "juliacall.py").write_text("raise RuntimeError('juliacall was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    for var in ("JULIA", "PYTHON_JULIAPKG_EXE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(pydso.ProblemError) as info:
        get_backend("julia")
    message = str(info.value)
    for needed in ("Julia executable", "julia", 'pip install "pydso[julia]"', "precompile", "never downloads"):
        assert needed in message, (needed, message)
    with pytest.raises(pydso.ProblemError, match="Julia backend is not available"):
        pydso.rollout(rotation_problem(), THETA, key=jax.random.key(0), n=1, backend="julia")
    # and without the juliacall package at all
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(pydso.ProblemError, match=r"juliacall is not installed.*pip install \"pydso\[julia\]\""):
        get_backend("julia")


def test_julia_backend_refuses_chains_and_bad_options():
    from pydso.backends.julia import JuliaBackend

    chain = pydso.Problem(
        pydso.DeterministicMap(lambda x, theta: theta * x),
        lambda x, theta: x @ x,
        pydso.FiniteHorizon(5),
        pydso.Fixed(jnp.ones(2)),
    )
    with pytest.raises(pydso.ProblemError, match="ODESystem and SDESystem"):
        JuliaBackend().check(chain)
    with pytest.raises(pydso.ProblemError, match="device"):
        JuliaBackend(device="tpu")
    with pytest.raises(pydso.ProblemError, match="solver"):
        JuliaBackend(solver="Euler")
