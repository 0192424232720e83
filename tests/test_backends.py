"""The JAX backend's kernels: the fixed-step ensemble fast path reproduces ``jax.vmap`` of ``diffrax.diffeqsolve``
with the same tableau (with and without driving inputs), Euler–Maruyama matches closed-form moments, and the one
checkpointed scan equals the plain scan."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pydso
from pydso.backends.jax import (
    RK4,
    RK4ThreeEighths,
    euler_maruyama_ensemble,
    fixed_step_applies,
    fixed_step_ensemble,
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
    with pytest.raises(pydso.ProblemError, match="multiple"):
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
    with pytest.raises(pydso.ProblemError, match="Kvaerno5"):
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


def test_fixed_step_applies():
    const, rc = diffrax.ConstantStepSize(), diffrax.RecursiveCheckpointAdjoint()
    assert fixed_step_applies(diffrax.Tsit5(), const, rc)
    assert fixed_step_applies(RK4(), const, diffrax.DirectAdjoint())
    assert fixed_step_applies(diffrax.Euler(), const, rc)
    assert not fixed_step_applies(diffrax.Tsit5(), diffrax.PIDController(1e-6, 1e-6), rc)
    assert not fixed_step_applies(diffrax.Kvaerno5(), const, rc)
    assert not fixed_step_applies(diffrax.Tsit5(), const, diffrax.BacksolveAdjoint())


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


# ------------------------------------------------------------------------------------------- driving inputs
def driven(t, x, u, th):
    # a damped pendulum driven by a 2-input torque, time-dependent too (checks stage times and stage inputs)
    g, damp = th[0], th[1]
    return jnp.stack([x[1], -g * jnp.sin(x[0]) - damp * x[1] + u[0] * jnp.cos(t) + u[1]])


def input_cost(x, u, th):
    return jnp.sum(x**2) + 0.5 * u @ u + 0.1 * th[0] * x[0] * u[1]


TH_DRIVEN = jnp.array([9.81, 0.3])


def _diffrax_zoh(x0, us, th, dt, save_every, solver, t0):
    """Piecewise-constant input as diffrax: one ODE solve per save interval with the input held as ``args``, on the
    step times ``t0 + n dt`` (``diffrax.StepTo``: stepping ``dt`` from a rounded interval start could otherwise add a
    clipped step at the end of an interval)."""

    def one(x0, us):
        def field(t, y, args):
            u, th = args
            x, _ = y
            return driven(t, x, u, th), input_cost(x, u, th)

        xs, cs, x = [x0], [], x0
        for k in range(us.shape[0] - 1):
            steps = t0 + (k * save_every + jnp.arange(save_every + 1, dtype=float)) * dt
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field),
                solver,
                t0=steps[0],
                t1=steps[-1],
                dt0=None,
                y0=(x, jnp.zeros((), x.dtype)),
                args=(us[k], th),
                stepsize_controller=diffrax.StepTo(ts=steps),
                max_steps=save_every + 4,
            )
            x = sol.ys[0][-1]
            xs.append(x)
            cs.append(sol.ys[1][-1])
        return jnp.stack(xs), jnp.stack(cs)

    return jax.vmap(one)(x0, us)


def _diffrax_linear(x0, us, th, dt, save_every, solver, t0):
    """Linearly interpolated input as diffrax: one solve with :class:`diffrax.LinearInterpolation` of the samples."""
    n_save = us.shape[1] - 1
    ts = t0 + save_every * dt * jnp.arange(n_save + 1, dtype=float)

    def one(x0, us):
        u_of_t = diffrax.LinearInterpolation(ts, us)

        def field(t, y, th):
            x, _ = y
            u = u_of_t.evaluate(t)
            return driven(t, x, u, th), input_cost(x, u, th)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            t0=ts[0],
            t1=ts[-1],
            dt0=dt,
            y0=(x0, jnp.zeros((), x0.dtype)),
            args=th,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=n_save * save_every + 8,
        )
        return sol.ys[0], jnp.diff(sol.ys[1])

    return jax.vmap(one)(x0, us)


@pytest.mark.parametrize("interpolation", ["zoh", "linear"])
@pytest.mark.parametrize("solver", [RK4(), diffrax.Tsit5(), diffrax.Heun()], ids=["RK4", "Tsit5", "Heun"])
def test_inputs_match_diffrax(interpolation, solver):
    N, dt, save_every, n_save, t0 = 3, 0.02, 3, 8, 0.1
    x0 = starts(jnp.array([1.0, 0.0]), n=N)
    us = jax.random.normal(jax.random.key(7), (N, n_save + 1, 2))
    kw = dict(dt=dt, n_steps=n_save * save_every, solver=solver, save_every=save_every, t0=t0)
    states, costs = fixed_step_ensemble(
        driven, x0, TH_DRIVEN, cost=input_cost, inputs=us, input_interpolation=interpolation, **kw
    )
    ref = _diffrax_zoh if interpolation == "zoh" else _diffrax_linear
    ref_states, ref_costs = ref(x0, us, TH_DRIVEN, dt, save_every, solver, t0)
    assert states.shape == (N, n_save + 1, 2) and costs.shape == (N, n_save)
    assert relerr(states, ref_states) < 1e-12
    assert relerr(costs, ref_costs) < 1e-12
    # the array-of-structs layout computes the same
    s_aos, c_aos = fixed_step_ensemble(
        driven, x0, TH_DRIVEN, cost=input_cost, inputs=us, input_interpolation=interpolation, layout="aos", **kw
    )
    assert relerr(s_aos, states) < 1e-14 and relerr(c_aos, costs) < 1e-14


@pytest.mark.parametrize("interpolation", ["zoh", "linear"])
def test_shared_inputs_equal_broadcast_per_trajectory_inputs(interpolation):
    N, n_save, save_every = 4, 6, 2
    x0 = starts(jnp.array([1.0, 0.0]), n=N)
    u = jax.random.normal(jax.random.key(8), (n_save + 1, 2))
    kw = dict(dt=0.05, n_steps=n_save * save_every, solver=RK4(), save_every=save_every, cost=input_cost)
    kw.update(input_interpolation=interpolation, checkpoints=3)
    shared = fixed_step_ensemble(driven, x0, TH_DRIVEN, inputs=u, **kw)
    per = fixed_step_ensemble(driven, x0, TH_DRIVEN, inputs=jnp.broadcast_to(u, (N,) + u.shape), **kw)
    for a, b in zip(shared, per, strict=True):  # equal up to the rounding of differently fused kernels
        assert relerr(a, b) < 1e-14


def test_inputs_closed_form_integrator():
    # x' = u: with a zero-order hold x(t_{k+1}) = x(t_k) + h u_k; with linear interpolation the trapezoid
    # x(t_{k+1}) = x(t_k) + h (u_k + u_{k+1}) / 2 (every RK method of order >= 2 integrates a linear u exactly).
    h, save_every = 0.3, 4
    u = jnp.array([1.0, -2.0, 0.5, 3.0, 0.0])
    x0 = jnp.zeros((1, 1))
    kw = dict(dt=h / save_every, n_steps=4 * save_every, save_every=save_every, solver=RK4())
    zoh, _ = fixed_step_ensemble(lambda t, x, u, th: u * jnp.ones(1), x0, None, inputs=u, **kw)
    lin, _ = fixed_step_ensemble(
        lambda t, x, u, th: u * jnp.ones(1), x0, None, inputs=u, input_interpolation="linear", **kw
    )
    np.testing.assert_allclose(zoh[0, :, 0], np.r_[0.0, np.cumsum(h * np.asarray(u[:-1]))], rtol=1e-14, atol=1e-15)
    trap = np.r_[0.0, np.cumsum(h * 0.5 * np.asarray(u[:-1] + u[1:]))]
    np.testing.assert_allclose(lin[0, :, 0], trap, rtol=1e-13, atol=1e-15)


def test_input_gradients_match_finite_differences():
    N, n_save, save_every = 2, 5, 2
    x0 = starts(jnp.array([1.0, 0.0]), n=N)
    us = jax.random.normal(jax.random.key(9), (N, n_save + 1, 2))

    def objective(us, th, interpolation):
        s, c = fixed_step_ensemble(
            driven,
            x0,
            th,
            dt=0.05,
            n_steps=n_save * save_every,
            solver=RK4(),
            save_every=save_every,
            cost=input_cost,
            inputs=us,
            input_interpolation=interpolation,
        )
        return jnp.sum(c) + jnp.sum(s[:, -1] ** 2)

    h = 1e-6
    for interpolation in ("zoh", "linear"):
        obj = jax.jit(lambda us, th, interpolation=interpolation: objective(us, th, interpolation))
        g_u, g_th = jax.grad(obj, argnums=(0, 1))(us, TH_DRIVEN)
        for idx in [(0, 0, 0), (1, 3, 1), (1, n_save, 0)]:
            fd = (obj(us.at[idx].add(h), TH_DRIVEN) - obj(us.at[idx].add(-h), TH_DRIVEN)) / (2 * h)
            np.testing.assert_allclose(g_u[idx], fd, rtol=1e-6, atol=1e-9)
        fd = (obj(us, TH_DRIVEN.at[1].add(h)) - obj(us, TH_DRIVEN.at[1].add(-h))) / (2 * h)
        np.testing.assert_allclose(g_th[1], fd, rtol=1e-6)
    # with a zero-order hold the last sample is never used
    g_u = jax.grad(lambda us: objective(us, TH_DRIVEN, "zoh"))(us)
    assert np.all(np.asarray(g_u[:, -1]) == 0.0)


def test_bad_inputs_raise_problem_errors():
    x0 = jnp.zeros((3, 2))
    kw = dict(dt=0.1, n_steps=4, solver=RK4())
    with pytest.raises(pydso.ProblemError, match=r"inputs must have shape \(n_save \+ 1, \*u_shape\)"):
        fixed_step_ensemble(driven, x0, TH_DRIVEN, inputs=jnp.zeros((4, 2)), **kw)
    with pytest.raises(pydso.ProblemError, match="input_interpolation"):
        fixed_step_ensemble(driven, x0, TH_DRIVEN, inputs=jnp.zeros((5, 2)), input_interpolation="cubic", **kw)
    with pytest.raises(pydso.ProblemError, match=r"x0 must have shape \(N, d\)"):
        fixed_step_ensemble(driven, jnp.zeros(2), TH_DRIVEN, **kw)
    with pytest.raises(pydso.ProblemError, match="n_steps must be a positive integer"):
        fixed_step_ensemble(driven, x0, TH_DRIVEN, dt=0.1, n_steps=2.0)


# ------------------------------------------------------------------------------------------- unrolled contractions
def test_unroll_small_contractions_is_the_same_function():
    from pydso.backends.jax._unroll import unroll_small_contractions

    rng = np.random.default_rng(0)
    A, Q, x = (jnp.asarray(rng.normal(size=s)) for s in ((3, 3), (3, 3), (3, 50)))
    W = jnp.asarray(rng.normal(size=(40, 3)))

    @jax.jit
    def inner(x, q):  # a jit-ed call inside: inlined and rewritten too
        return x @ q @ x

    def g(x, th):
        A, Q, W, scale, _ = th
        y = A @ x + jnp.tanh(W.T @ jnp.tanh(W @ x))  # 3 and 3 terms (unrolled), 40 terms (kept as a matmul)
        return jnp.sum(y**2) * scale + inner(x, Q) + jnp.einsum("i,ij,j->", x, Q, y), jnp.max(x)

    th = (A, Q, W, 0.5, "a non-array leaf")
    batched = jax.vmap(g, in_axes=(1, None))
    fast = unroll_small_contractions(batched)
    jaxpr = str(jax.make_jaxpr(lambda x: fast(x, th))(x))
    assert "reduce_sum" not in jaxpr
    assert jaxpr.count("dot_general") == 1  # only W.T @ h (40 terms) remains a matrix product
    for a, b in zip(fast(x, th), batched(x, th), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13)
    ga = jax.grad(lambda x, A: jnp.sum(fast(x, (A, Q, W, 0.5, None))[0]), argnums=(0, 1))(x, A)
    gb = jax.grad(lambda x, A: jnp.sum(batched(x, (A, Q, W, 0.5, None))[0]), argnums=(0, 1))(x, A)
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_linear_system_with_matrix_parameters_matches_diffrax():
    # x' = A x, L = x' Q x: contractions in the vector field and the cost, gradients w.r.t. the matrices
    rng = np.random.default_rng(1)
    A = jnp.asarray(-np.eye(4) + 0.3 * rng.normal(size=(4, 4)))
    Q = jnp.asarray(np.eye(4) + 0.1 * np.ones((4, 4)))
    x0 = jnp.asarray(rng.normal(size=(5, 4)))

    def field(t, x, th):
        return th["A"] @ x

    def cost(x, th):
        return x @ th["Q"] @ x

    th = {"A": A, "Q": Q}

    def fast(th):
        return fixed_step_ensemble(field, x0, th, dt=0.05, n_steps=40, solver=RK4(), cost=cost)

    def ref(th):
        return reference(field, x0, th, 0.05, 40, RK4(), cost)

    (s, c), (rs, rc) = fast(th), ref(th)
    assert relerr(s, rs) < 1e-12 and relerr(c, rc) < 1e-12
    ga = jax.grad(lambda th: jnp.sum(fast(th)[1]))(th)
    gb = jax.grad(lambda th: jnp.sum(ref(th)[1]))(th)
    for k in th:
        np.testing.assert_allclose(ga[k], gb[k], rtol=1e-11)


def test_widths_padded_against_cache_aliasing_give_the_same_trajectories():
    # N = 512 runs 8 extra trajectories inside the kernels (see ALIAS_PERIOD); they must not show.
    from pydso.backends.jax._fastpath import ALIAS_PERIOD, alias_pad

    N = ALIAS_PERIOD
    assert alias_pad(N) > 0 and alias_pad(N - 12) == 0
    x0 = starts(jnp.array([1.0, 0.0]), n=N)
    us = jax.random.normal(jax.random.key(4), (N, 5, 2))
    kw = dict(dt=0.05, n_steps=8, solver=RK4(), save_every=2, cost=input_cost, inputs=us)
    s, c = fixed_step_ensemble(driven, x0, TH_DRIVEN, **kw)
    kw_head = dict(kw, inputs=us[: N - 12])
    s_head, c_head = fixed_step_ensemble(driven, x0[: N - 12], TH_DRIVEN, **kw_head)
    assert s.shape == (N, 5, 2) and c.shape == (N, 4)
    assert relerr(s[: N - 12], s_head) < 1e-14 and relerr(c[: N - 12], c_head) < 1e-14
    keys = jax.random.split(jax.random.key(5), N)
    em = dict(dt=0.01, n_steps=6, cost=lambda x, th: jnp.sum(x))
    drift, diff = (lambda t, x, th: -th * x), (lambda t, x, th: 0.5)
    s, c = euler_maruyama_ensemble(drift, diff, x0, 1.3, key=keys, **em)
    s_head, c_head = euler_maruyama_ensemble(drift, diff, x0[: N - 12], 1.3, key=keys[: N - 12], **em)
    assert s.shape == (N, 7, 2) and relerr(s[: N - 12], s_head) < 1e-14 and relerr(c[: N - 12], c_head) < 1e-14


def test_backend_registry_selects_by_name_and_explains_missing_ones():
    from pydso.backends import JaxBackend, available_backends, get_backend, register_backend

    assert "jax" in available_backends() and isinstance(get_backend(None), JaxBackend)
    mine = JaxBackend(integrator="diffrax")
    assert get_backend(mine) is mine
    with pytest.raises(pydso.ProblemError, match="backend must be one of"):
        get_backend("no-such-backend")
    register_backend("test-lazy-missing", "pydso_no_such_module:Backend")  # a lazily imported optional backend
    with pytest.raises(pydso.ProblemError, match="not available here"):
        get_backend("test-lazy-missing")


@pytest.mark.parametrize("length", [1, 5, 16, 37])
def test_episode_major_scan_equals_a_scan_then_a_transpose(length):
    from pydso.backends.jax._scan import episode_major_scan

    rng = np.random.default_rng(length)
    A = jnp.asarray(rng.normal(size=(3, 3))) * 0.3
    x0 = jnp.asarray(rng.normal(size=(7, 3)))
    us = jnp.asarray(rng.normal(size=(length, 7)))

    def f(carry, u):
        x, k = carry
        x1 = jnp.tanh(A @ x) + u  # x: (3, 7), struct of arrays
        return (x1, k + 1), (x1, (None, jnp.sum(x1**2, axis=0), u * k))

    def plain(x0, A_):
        (xe, _), (xs, (_, c, e)) = jax.lax.scan(f, (x0.T, jnp.asarray(0.0)), us)
        return xe, jnp.concatenate([x0[None], jnp.transpose(xs, (0, 2, 1))]).transpose(1, 0, 2), c.T, e.T

    def blocked(x0, A_):
        (xe, _), states, (none, c, e) = episode_major_scan(f, (x0.T, jnp.asarray(0.0)), us, length, first=x0, block=16)
        assert none is None
        return xe, states, c, e

    for a, b in zip(blocked(x0, A), plain(x0, A), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    # reverse mode through the blocked writer: the same gradient
    loss = lambda run: lambda x0: sum(jnp.sum(jnp.sin(o)) for o in run(x0, A))  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss(blocked))(x0), jax.grad(loss(plain))(x0), rtol=1e-12)


def test_unrolled_contractions_keep_the_struct_of_arrays_layout_in_reverse_mode():
    # Slicing rows of the (d, N) operands (not transposing them to (N, d) first) keeps every cotangent in the
    # struct-of-arrays layout: no transpose in the reverse pass of a batched x @ Q @ x.
    from pydso.backends.jax._unroll import unroll_small_contractions

    Q = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)))
    cost = unroll_small_contractions(jax.vmap(lambda x, q: x @ q @ x, in_axes=(1, None)))
    x = jnp.ones((3, 20))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(cost(x, Q))))(x))
    assert "transpose" not in jaxpr and "dot_general" not in jaxpr
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(cost(x, Q)))(x), (Q + Q.T) @ x, rtol=1e-13)
