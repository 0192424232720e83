"""Problem constructors: the contract (pydso.problems), Gauss–Newton / Levenberg–Marquardt as methods of minimize,
and the sysid simulation through the JAX backend's fixed-step integrator."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pydso
from pydso.data import make_dataset
from pydso.optimize import AbstractLeastSquares, GaussNewton, LevenbergMarquardt, solve_least_squares
from pydso.problems import AbstractConstructedProblem
from pydso.problems import sysid as S

TRUE = {"d": 0.3, "k": 1.7, "k3": 0.8, "g": 1.2}
DT = 0.1


def duffing(t, x, u, th):
    return jnp.array([x[1], -th["d"] * x[1] - th["k"] * x[0] - th["k3"] * x[0] ** 3 + th["g"] * u[0]])


def first_output(x, u, th):
    return x[:1]


def make_model(**kw):
    return S.ContinuousModel(
        duffing,
        first_output,
        {"d": 0.4, "k": 2.0, "k3": 1.0, "g": 1.5},
        x0=[0.0, 0.0],
        transforms={"d": "positive", "k": "positive"},
        **kw,
    )


@pytest.fixture(scope="module")
def noise_free():
    model = make_model()
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, 80, 1))
    y = S.simulate(model, TRUE, u, dt=DT, x0=[0.5, -0.2])
    return model, make_dataset(y, input=u, output=y, dt=DT)


# ------------------------------------------------------------------------------------------------ contract
def test_sysid_constructor_follows_the_contract(noise_free):
    model, ds = noise_free
    p = S.sysid(model, ds)
    assert isinstance(p, AbstractConstructedProblem) and isinstance(p, AbstractLeastSquares)
    assert p.problem is p
    assert p.theta0.ndim == 1 and p.theta0.shape == (4 + 2 * 2,)  # 4 parameters + 2 episodes x 2 initial states
    r = p.residuals(p.theta0)
    assert r.ndim == 1 and r.shape == (2 * 80,)
    assert float(p.objective(p.theta0)) == pytest.approx(0.5 * float(jnp.sum(r**2)))
    rep = p.result(p.theta0)  # the report at any theta; no solver information
    assert isinstance(rep, S.SysIdResult) and not rep.converged and "no solver information" in rep.message
    assert rep.as_dict() == pytest.approx({"d": 0.4, "k": 2.0, "k3": 1.0, "g": 1.5})


# ------------------------------------------------------------------------------------------------ methods
@eqx.filter_jit
def _step(method, problem, theta, state, key):
    return method.step(problem, theta, state, key=key)


def _loop(method, problem, theta, n, state=None):
    """``n`` steps of ``method`` from ``theta`` (as pydso.minimize takes them): ``(theta, state, [stats])``."""
    state = method.init(problem, theta) if state is None else state
    stats = []
    for k in range(n):
        theta, state, s = _step(method, problem, theta, state, jax.random.key(k))
        stats.append(s)
    return theta, state, stats


def test_levenberg_marquardt_steps_reach_the_fit_optimum(noise_free):
    """The method's init/step loop (what minimize runs) and fit (one compiled loop) are the same iteration."""
    model, ds = noise_free
    p = S.sysid(model, ds)
    m = LevenbergMarquardt(rtol=1e-10, atol=1e-10)
    sol = solve_least_squares(p, p.theta0, method=m, max_steps=100)
    assert int(sol.code) == 0 and 3 < int(sol.num_steps) < 100
    theta, _, stats = _loop(m, p, p.theta0, int(sol.num_steps) + 3)
    np.testing.assert_array_equal(np.asarray(theta), np.asarray(sol.theta))  # extra steps after termination: no-ops
    obj = np.array([float(s.objective) for s in stats])
    assert np.all(np.diff(obj) <= 1e-12 * obj[0]) and obj[0] > 1.0 and obj[-1] < 1e-20
    assert all(float(s.objective_stderr) == 0.0 for s in stats)
    assert float(stats[0].grad_norm) > 1.0 and float(stats[-1].grad_norm) < 1e-8
    res = p.result(theta, n_steps=int(sol.num_steps), code=0)
    for name, v in TRUE.items():
        assert res.as_dict()[name] == pytest.approx(v, rel=1e-8), name
    fitted = p.fit()
    np.testing.assert_allclose(fitted.estimate, res.estimate, rtol=1e-12)
    assert fitted.n_steps == int(sol.num_steps)


def test_gauss_newton_method_and_fit_agree(noise_free):
    model, ds = noise_free
    p = S.sysid(model, ds, params={"d": 0.35, "k": 1.8, "k3": 0.7, "g": 1.1})
    gn = GaussNewton(rtol=1e-10, atol=1e-10)
    res = p.fit(solver=gn)
    assert res.converged
    for name, v in TRUE.items():
        assert res.as_dict()[name] == pytest.approx(v, rel=1e-8), name
    theta, _, stats = _loop(gn, p, p.theta0, res.n_steps)
    np.testing.assert_allclose(p.result(theta).estimate, res.estimate, rtol=1e-10)


def test_minimize_runs_levenberg_marquardt_on_a_sysid_problem(noise_free, tmp_path):
    model, ds = noise_free
    p = S.sysid(model, ds)
    lm = pydso.LevenbergMarquardt()
    out = pydso.minimize(p, p.theta0, key=jax.random.key(0), method=lm, steps=40)
    res = p.result(out.theta)
    for name, v in TRUE.items():
        assert res.as_dict()[name] == pytest.approx(v, rel=1e-6), name
    obj = out.history["objective"]
    # LM's own termination test stops minimize early, with the step count and the reason
    assert out.message.startswith("converged") and len(obj) == out.steps < 40
    assert np.all(np.diff(obj) <= 1e-12 * obj[0]) and obj[-1] < 1e-12 * obj[0]
    # the method state goes through minimize's checkpoint: an interrupted and resumed run is bit-identical
    ck = tmp_path / "lm.npz"
    pydso.minimize(p, p.theta0, key=jax.random.key(0), method=lm, steps=3, checkpoint=ck, checkpoint_every=2)
    resumed = pydso.minimize(p, p.theta0, key=jax.random.key(0), method=lm, steps=40, checkpoint=ck)
    straight = pydso.minimize(p, p.theta0, key=jax.random.key(0), method=lm, steps=40)
    assert resumed.steps == straight.steps == out.steps and resumed.message == straight.message
    np.testing.assert_array_equal(np.asarray(resumed.theta), np.asarray(straight.theta))
    np.testing.assert_array_equal(resumed.history["objective"], straight.history["objective"])
    with pytest.raises(pydso.ProblemError):  # another method's settings: refused
        pydso.minimize(p, p.theta0, key=jax.random.key(0), method=pydso.GaussNewton(), steps=20, checkpoint=ck)


class Rosenbrock(AbstractLeastSquares):
    """r = (a - x, 10 (y - x^2)) over a pytree theta = {"x", "y"}: minimum (a, a^2), a curved valley."""

    a: jax.Array

    def residuals(self, theta):
        return jnp.stack([self.a - theta["x"], 10.0 * (theta["y"] - theta["x"] ** 2)])


@pytest.mark.parametrize(
    "method",
    [LevenbergMarquardt(), LevenbergMarquardt(jac="bwd", scale=False), GaussNewton()],
    ids=["lm", "lm-bwd", "gn"],
)
def test_methods_solve_a_pytree_least_squares_problem(method):
    p = Rosenbrock(jnp.asarray(1.5))
    sol = solve_least_squares(p, {"x": jnp.asarray(-1.2), "y": jnp.asarray(1.0)}, method=method, max_steps=200)
    assert int(sol.code) == 0 and sol.message == "successful"
    assert float(sol.theta["x"]) == pytest.approx(1.5, abs=1e-8) and float(sol.theta["y"]) == pytest.approx(2.25)
    short = solve_least_squares(p, {"x": jnp.asarray(-1.2), "y": jnp.asarray(1.0)}, method=method, max_steps=1)
    assert int(short.code) == 1 and short.message == "max_steps reached" and int(short.num_steps) == 1


def test_state_is_arrays_and_a_restored_run_is_bit_identical(noise_free):
    """The state is a pytree of arrays (checkpointable leaf by leaf); restoring it from NumPy copies and going on
    gives exactly the uninterrupted iterates. The parameters are really rescaled, and theta is the state's image."""
    model, ds = noise_free
    p = S.sysid(model, ds)
    m = LevenbergMarquardt()
    theta_a, state_a, _ = _loop(m, p, p.theta0, 6)
    leaves, treedef = jax.tree.flatten(state_a)
    assert all(isinstance(x, jax.Array) for x in leaves)
    restored = jax.tree.unflatten(treedef, [jnp.asarray(np.asarray(x)) for x in leaves])
    theta_b, _, _ = _loop(m, p, jnp.asarray(np.asarray(theta_a)), 4, state=restored)
    theta_c, _, _ = _loop(m, p, p.theta0, 10)
    np.testing.assert_array_equal(np.asarray(theta_b), np.asarray(theta_c))
    scale = np.asarray(state_a.scale)
    assert np.ptp(np.log10(scale)) > 0.3  # the parameters really are rescaled
    np.testing.assert_array_equal(np.asarray(state_a.w) * scale, np.asarray(theta_a))


def test_least_squares_methods_refuse_what_they_cannot_solve(noise_free):
    model, ds = noise_free
    m = LevenbergMarquardt()
    chain = pydso.Problem(
        pydso.DeterministicMap(lambda x, th: th["a"] * x),
        lambda x, th: jnp.sum(x**2),
        pydso.Episodic(gamma=0.9, horizon=5),
        pydso.Fixed(jnp.ones(1)),
    )
    with pytest.raises(pydso.ProblemError, match="needs a least-squares problem.*got Problem"):
        m.check(chain, {"a": jnp.asarray(0.5)})
    nll = S.sysid(model, ds, loss="nll")
    with pytest.raises(S.SysIdError, match="not a least-squares objective"):
        m.check(nll, nll.theta0)
    with pytest.raises(S.SysIdError, match="not a least-squares objective"):
        solve_least_squares(nll, nll.theta0)

    class Matrix(AbstractLeastSquares):
        def residuals(self, theta):
            return jnp.outer(theta, theta)

    with pytest.raises(pydso.ProblemError, match="must return a 1-D array, got \\(2, 2\\)"):
        m.check(Matrix(), jnp.ones(2))
    p = S.sysid(model, ds)
    with pytest.raises(pydso.ProblemError, match="needs float leaves"):
        m.check(p, jnp.zeros(p.theta0.shape, int))
    with pytest.raises(pydso.ProblemError, match="rtol must be a non-negative float"):
        LevenbergMarquardt(rtol=-1.0)
    with pytest.raises(pydso.ProblemError, match="jac must be 'fwd' or 'bwd'"):
        GaussNewton(jac="central")
    assert LevenbergMarquardt().describe() != LevenbergMarquardt(scale=False).describe()
    assert "GaussNewton(rtol=1e-08" in GaussNewton().describe()


def test_problems_of_equal_shape_share_the_compiled_solve():
    """Fitting a second experiment of the same shape with the same model object compiles nothing (the problem's
    arrays are traced arguments of the compiled solve and covariance pass)."""
    model = make_model()
    rng = np.random.default_rng(3)
    truths = [TRUE, {"d": 0.5, "k": 2.5, "k3": 0.4, "g": 0.9}]
    data = []
    for truth in truths:
        u = rng.normal(size=(1, 60, 1))
        y = S.simulate(model, truth, u, dt=DT, x0=[0.1, 0.0])
        data.append(make_dataset(y, input=u, output=y, dt=DT))

    class Messages(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    first = S.fit(model, data[0])
    log = Messages()
    logging.getLogger("jax").addHandler(log)
    try:
        with jax.log_compiles(True):
            second = S.fit(model, data[1])
    finally:
        logging.getLogger("jax").removeHandler(log)
    assert log.messages, "jax.log_compiles reported nothing: the check would be vacuous"
    compiled = [m for m in log.messages if "compil" in m.lower()]
    assert not compiled, compiled
    for res, truth in zip((first, second), truths, strict=True):  # each fit used its own data
        assert res.converged and res.as_dict() == pytest.approx(truth, rel=1e-6)


# ------------------------------------------------------------------------------------------------ simulation
def _rk4_reference(f, x, u, theta, dt, substeps, interpolation):
    """The classic RK4 written out (the former sysid integrator), in NumPy-like JAX, as an independent oracle."""
    ys = [x]
    h = dt / substeps
    for k in range(u.shape[0] - 1):
        u0, u1 = u[k], u[k + 1]
        for j in range(substeps):
            s0 = j / substeps
            if interpolation == "zoh":
                ua = ub = uc = u0
            else:
                ua = u0 + (u1 - u0) * s0
                ub = u0 + (u1 - u0) * (s0 + 0.5 / substeps)
                uc = u0 + (u1 - u0) * (s0 + 1.0 / substeps)
            t = k * dt + s0 * dt
            k1 = f(t, x, ua, theta)
            k2 = f(t + h / 2, x + h / 2 * k1, ub, theta)
            k3 = f(t + h / 2, x + h / 2 * k2, ub, theta)
            k4 = f(t + h, x + h * k3, uc, theta)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        ys.append(x)
    return np.stack(ys)


@pytest.mark.parametrize("interpolation", ["zoh", "linear"])
@pytest.mark.parametrize("substeps", [1, 3])
def test_continuous_simulation_is_the_backend_rk4(interpolation, substeps):
    model = make_model(input=interpolation, substeps=substeps)
    rng = np.random.default_rng(7)
    u = rng.normal(size=(3, 40, 1))
    x0 = rng.normal(size=(3, 2))
    th = {k: jnp.asarray(v) for k, v in TRUE.items()}
    xs = np.asarray(S.simulate_states(model, th, jnp.asarray(x0), jnp.asarray(u), dt=DT))
    assert xs.shape == (3, 40, 2)
    for e in range(3):
        ref = _rk4_reference(duffing, jnp.asarray(x0[e]), jnp.asarray(u[e]), th, DT, substeps, interpolation)
        np.testing.assert_allclose(xs[e], ref, rtol=1e-12, atol=1e-13)
    ys = S.simulate(model, TRUE, u, dt=DT, x0=x0)
    np.testing.assert_allclose(ys, xs[..., :1], rtol=1e-12, atol=1e-13)


def test_fixed_step_simulation_converges_to_the_diffrax_reference():
    rng = np.random.default_rng(8)
    u = rng.normal(size=(1, 50, 1))
    ref_model = make_model(input="linear", integrator="diffrax", rtol=1e-12, atol=1e-12)
    ref = S.simulate(ref_model, TRUE, u, dt=DT, x0=[0.3, 0.0])
    errs = [
        np.max(np.abs(S.simulate(make_model(input="linear", substeps=n), TRUE, u, dt=DT, x0=[0.3, 0.0]) - ref))
        for n in (1, 2, 4)
    ]
    assert errs[0] < 1e-3 and errs[2] < 1e-5
    assert errs[0] / errs[1] > 10 and errs[1] / errs[2] > 10  # fourth order: ~16x per halving


def test_simulate_compiles_per_model_object_not_per_id():
    """Models created and dropped in a loop (ids may be reused) each simulate their own vector field."""
    u = np.ones((20, 1))
    for gain in (1.0, 2.0, 3.0, 4.0):
        model = S.ContinuousModel(
            lambda t, x, u, th, g=gain: jnp.array([g * u[0] - th["a"] * x[0]]), None, {"a": 1.0}, x0=[0.0]
        )
        y = S.simulate(model, {"a": 0.0}, u, dt=0.1, x0=[0.0])
        np.testing.assert_allclose(y[-1, 0], gain * 1.9, rtol=1e-12)
        del model
