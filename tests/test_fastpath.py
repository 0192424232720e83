"""The fixed-step ensemble fast path reproduces ``jax.vmap`` of ``diffrax.diffeqsolve`` with the same tableau."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pydso
from pydso.backends.jax._fastpath import (
    RK4,
    RK4ThreeEighths,
    euler_maruyama_ensemble,
    fixed_step_ensemble,
    supports,
    tableau_of,
)

SOLVERS = {
    "Tsit5": diffrax.Tsit5(),
    "Dopri5": diffrax.Dopri5(),
    "Bosh3": diffrax.Bosh3(),
    "Heun": diffrax.Heun(),
    "Euler": diffrax.Euler(),
    "RK4": RK4(),
}


def lorenz(t, x, th):
    s, r, b = th[0], th[1], th[2]
    return jnp.stack([s * (x[1] - x[0]), x[0] * (r - x[2]) - x[1], x[0] * x[1] - b * x[2]])


def pendulum(t, x, th):
    # damped, driven pendulum: time-dependent, so the stage times t_n + c_i dt are checked too
    g, damp, amp = th[0], th[1], th[2]
    return jnp.stack([x[1], -g * jnp.sin(x[0]) - damp * x[1] + amp * jnp.cos(t)])


def quad_cost(x, th):
    return jnp.sum(x**2) + 0.1 * th[0] * x[0]


LORENZ = (lorenz, jnp.array([10.0, 28.0, 8 / 3]), jnp.array([1.0, 1.0, 20.0]), 0.01, 60)
PENDULUM = (pendulum, jnp.array([9.81, 0.3, 0.5]), jnp.array([1.0, 0.0]), 0.02, 50)
SYSTEMS = {"lorenz": LORENZ, "pendulum": PENDULUM}


def reference(f, x0, th, dt, n, solver, cost, save_every=1, t0=0.0):
    """jax.vmap of diffrax.diffeqsolve with the running cost as an augmented state (as pydso.engine does)."""

    def one(x0):
        def field(t, y, args):
            x, _ = y
            return f(t, x, th), cost(x, th)

        ts = jnp.linspace(t0, t0 + n * dt, n // save_every + 1)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            t0=t0,
            t1=t0 + n * dt,
            dt0=dt,
            y0=(x0, jnp.zeros((), x0.dtype)),
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=n + 8,
        )
        return sol.ys[0], jnp.diff(sol.ys[1])

    return jax.vmap(one)(x0)


def relerr(a, b):
    """Max abs difference relative to the max magnitude of the reference, per trajectory."""
    a, b = np.asarray(a), np.asarray(b)
    axes = tuple(range(1, a.ndim))
    return float(np.max(np.max(np.abs(a - b), axis=axes) / np.max(np.abs(b), axis=axes)))


def starts(x_base, n=4, seed=0):
    return x_base + 0.3 * jax.random.normal(jax.random.key(seed), (n, x_base.shape[0]))


@pytest.mark.parametrize("system", list(SYSTEMS))
@pytest.mark.parametrize("name", list(SOLVERS))
def test_matches_diffrax(system, name):
    f, th, xb, dt, n = SYSTEMS[system]
    solver = SOLVERS[name]
    x0 = starts(xb)
    states, costs = fixed_step_ensemble(f, x0, th, dt=dt, n_steps=n, solver=solver, cost=quad_cost, t0=0.1)
    ref_states, ref_costs = reference(f, x0, th, dt, n, solver, quad_cost, t0=0.1)
    assert states.shape == (4, n + 1, xb.shape[0]) and costs.shape == (4, n)
    assert relerr(states, ref_states) < 1e-12
    assert relerr(costs, ref_costs) < 1e-12


def test_save_every_and_layouts_and_checkpoints():
    f, th, xb, dt, n = LORENZ
    x0 = starts(xb)
    full, cfull = fixed_step_ensemble(f, x0, th, dt=dt, n_steps=n, solver=RK4(), cost=quad_cost)
    for layout in ("soa", "aos"):
        for ck in (None, 4, 7, 30):  # 30 > 12 save intervals: segments inside each interval
            s, c = fixed_step_ensemble(
                f,
                x0,
                th,
                dt=dt,
                n_steps=n,
                solver=RK4(),
                cost=quad_cost,
                save_every=5,
                layout=layout,
                checkpoints=ck,
            )
            assert s.shape == (4, n // 5 + 1, 3) and c.shape == (4, n // 5)
            assert relerr(s, full[:, ::5]) < 1e-13
            assert relerr(c, cfull.reshape(4, n // 5, 5).sum(-1)) < 1e-12
    ref_s, ref_c = reference(f, x0, th, dt, n, RK4(), quad_cost, save_every=5)
    assert relerr(s, ref_s) < 1e-12 and relerr(c, ref_c) < 1e-12
    s, c = fixed_step_ensemble(f, x0, th, dt=dt, n_steps=n, solver=RK4())
    assert c is None and relerr(s, full) < 1e-14
    with pytest.raises(ValueError, match="multiple"):
        fixed_step_ensemble(f, x0, th, dt=dt, n_steps=n, save_every=7)


def test_rk4_tableaux():
    a, b, c = tableau_of(RK4())
    assert b == (1 / 6, 1 / 3, 1 / 3, 1 / 6) and c == (0.0, 0.5, 0.5, 1.0)
    a, b, c = tableau_of(RK4ThreeEighths())
    assert b == (1 / 8, 3 / 8, 3 / 8, 1 / 8)
    # both are 4th order: error ratio ~16 when halving the step (linear test problem x' = -x)
    for solver in (RK4(), RK4ThreeEighths()):
        errs = []
        for n in (10, 20):
            s, _ = fixed_step_ensemble(
                lambda t, x, th: -x, jnp.ones((1, 1)), None, dt=1.0 / n, n_steps=n, solver=solver, save_every=n
            )
            errs.append(abs(float(s[0, -1, 0]) - np.exp(-1.0)))
        assert 14 < errs[0] / errs[1] < 18
    with pytest.raises(TypeError):
        tableau_of(diffrax.Kvaerno5())


def _objective(fast, th, x0, solver, checkpoints=None):
    f, _, _, dt, n = LORENZ
    if fast:
        s, c = fixed_step_ensemble(f, x0, th, dt=dt, n_steps=n, solver=solver, cost=quad_cost, checkpoints=checkpoints)
    else:
        s, c = reference(f, x0, th, dt, n, solver, quad_cost)
    return jnp.mean(jnp.sum(c, axis=1) + jnp.sum(s[:, -1] ** 2, axis=-1))


def test_gradients():
    solver = diffrax.Tsit5()
    _, th, xb, _, _ = LORENZ
    x0 = starts(xb, n=3)
    obj = jax.jit(lambda th, x0: _objective(True, th, x0, solver))
    g_th, g_x0 = jax.grad(obj, argnums=(0, 1))(th, x0)
    # central finite differences (fp64)
    h = 1e-6
    fd = np.array([(obj(th.at[i].add(h), x0) - obj(th.at[i].add(-h), x0)) / (2 * h) for i in range(3)])
    np.testing.assert_allclose(g_th, fd, rtol=1e-6)
    fd_x = (obj(th, x0.at[1, 2].add(h)) - obj(th, x0.at[1, 2].add(-h))) / (2 * h)
    np.testing.assert_allclose(g_x0[1, 2], fd_x, rtol=1e-6)
    # gradient through diffrax (RecursiveCheckpointAdjoint) with the same tableau
    g_ref = jax.grad(lambda th: _objective(False, th, x0, solver))(th)
    np.testing.assert_allclose(g_th, g_ref, rtol=1e-11)
    # checkpointed == plain (7 does not divide 60: exercises the remainder segment)
    g_ck = jax.grad(lambda th: _objective(True, th, x0, solver, checkpoints=7))(th)
    np.testing.assert_allclose(g_ck, g_th, rtol=1e-12)


def test_supports():
    f = LORENZ[0]
    assert supports(pydso.ODESystem(f, dt=0.01))
    assert supports(pydso.ODESystem(f, dt=0.01, solver=RK4()))
    assert supports(pydso.ODESystem(f, dt=0.01, solver=diffrax.Euler()))
    assert not supports(pydso.ODESystem(f, dt=0.01, stepsize_controller=diffrax.PIDController(1e-6, 1e-6)))
    assert not supports(pydso.ODESystem(f, dt=0.01, solver=diffrax.Kvaerno5()))
    assert not supports(pydso.ODESystem(f, dt=0.01, adjoint=diffrax.BacksolveAdjoint()))
    assert not supports(pydso.SDESystem(f, lambda t, x, th: 1.0))
    assert not supports(object())


@pytest.mark.parametrize("per_path", [False, True])
def test_euler_maruyama_ou_moments(per_path):
    # dX = -k (X - mu) dt + s dW; Euler–Maruyama with step dt is exactly the AR(1)
    # X_{n+1} = mu + (1 - k dt)(X_n - mu) + s sqrt(dt) xi, so its moments are known in closed form
    # (and tend to the OU ones as dt -> 0). Compare mean and variance at the end within 4 standard errors.
    k, mu, s = 1.5, 0.7, 0.8
    th = jnp.array([k, mu, s])
    N, n, dt = 20000, 100, 0.01
    x0 = jnp.full((N, 2), 2.0)
    key = jax.random.split(jax.random.key(3), N) if per_path else jax.random.key(3)
    states, costs = euler_maruyama_ensemble(
        lambda t, x, th: -th[0] * (x - th[1]),
        lambda t, x, th: th[2],
        x0,
        th,
        dt=dt,
        n_steps=n,
        key=key,
        cost=lambda x, th: jnp.sum(x),
        save_every=10,
    )
    assert states.shape == (N, 11, 2) and costs.shape == (N, 10)
    a = 1 - k * dt
    mean = mu + a**n * (2.0 - mu)
    var = s**2 * dt * (1 - a ** (2 * n)) / (1 - a**2)
    # the OU closed form is close (O(dt)) to the discrete one
    t = n * dt
    assert abs(mean - (mu + np.exp(-k * t) * (2.0 - mu))) < 0.01
    assert abs(var - s**2 / (2 * k) * (1 - np.exp(-2 * k * t))) < 0.01 * var + 1e-3
    xT = np.asarray(states[:, -1]).ravel()  # 2N samples (independent components)
    m = xT.size
    assert abs(xT.mean() - mean) < 4 * np.sqrt(var / m)
    assert abs(xT.var() - var) < 4 * var * np.sqrt(2 / (m - 1))
    # left-point rule: with save_every=1 the cost of step n is L(x_n) dt exactly
    states, costs = euler_maruyama_ensemble(
        lambda t, x, th: -th[0] * (x - th[1]),
        lambda t, x, th: th[2],
        x0[:8],
        th,
        dt=dt,
        n_steps=20,
        key=key[:8] if per_path else key,
        cost=lambda x, th: jnp.sum(x),
    )
    np.testing.assert_allclose(costs, states[:, :-1].sum(-1) * dt, rtol=1e-14)
