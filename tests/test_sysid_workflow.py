"""System identification on real-data workflows (issue 12): multi-start, fixed parameters, initial-state transforms,
validation on new data, early stopping and regularisation, smooth nonlinearities, and the regression tests of its
bugs (stop reasons, warm starts on a bound, bounded intervals, the callable ``sysid`` import, hybrid simulate,
divergence advice, factory tracebacks) and of the sysid items of issue 11 (non-finite guesses, time axes)."""

import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
import xarray as xr

import pydso
from pydso.data import make_dataset
from pydso.optimize import RESULT_NAMES, result_code, result_message, solve_least_squares
from pydso.problems import sysid as S


# ------------------------------------------------------------------------------------------------ models and data
def first_order(x, u, th):
    return th["a"] * x + th["b"] * u


FIRST = S.DiscreteModel(first_order, None, {"a": 0.5, "b": 0.5}, x0=[0.0])
BOUNDED = S.DiscreteModel(first_order, None, {"a": 0.5, "b": 0.5}, x0=[0.0], transforms={"a": (0.0, 0.9)})


def simulate_first(a, b, u, x0):
    """Exact outputs of x_{k+1} = a x_k + b u_k, y = x (numpy; u (E, T))."""
    x = np.zeros(u.shape)
    x[:, 0] = x0
    for k in range(u.shape[1] - 1):
        x[:, k + 1] = a * x[:, k] + b * u[:, k]
    return x


def io(u, y, dt=1.0):
    return make_dataset(y[..., None], input=u[..., None], output=y[..., None], dt=dt)


def rotation(x, u, th):
    c, s = jnp.cos(th["w"]), jnp.sin(th["w"])
    return jnp.array([c * x[0] - s * x[1], s * x[0] + c * x[1]])


ROT = S.DiscreteModel(rotation, lambda x, u, th: x[:1], {"w": 1.0}, x0=[1.0, 0.0], autonomous=True, estimate_x0=False)


def rotation_data(w=0.3, T=80):
    k = np.arange(T)
    y = np.cos(w * k)[None, :, None]
    return make_dataset(y, output=y, dt=1.0)


# ------------------------------------------------------------------------------------------------ bugs (issue 12)
def test_stop_reasons_use_optimistix_result_names_and_warn_on_large_gradient():
    """Regression: max_steps used to be reported as 'solver result code 7' and a non-finite linear solve as
    'nonlinear solver failed'. Now: optimistix's public names, a stop reason, and a warning (and
    converged=False) when LM stops where the gradient is not small relative to the cost."""
    for name in RESULT_NAMES:
        code = int(result_code(getattr(optx.RESULTS, name)))
        assert RESULT_NAMES[code] == name
        assert name in result_message(code) or (name, result_message(code)) == (
            "max_steps_reached",
            "max_steps reached",
        )
    assert "singular" in result_message(RESULT_NAMES.index("singular"))
    ds = rotation_data()
    ds["output"] = ds["output"] + 0.01 * np.random.default_rng(0).normal(size=ds["output"].shape)
    with pytest.warns(S.SysIdWarning, match="gradient is not small"):
        short = S.fit(ROT, ds, params={"w": 0.25}, max_steps=1)
    assert short.stop_reason == "max_steps_reached" and not short.converged
    assert "max_steps reached (1 steps" in short.message and short.grad_cosine > 1e-4
    full = S.fit(ROT, ds, params={"w": 0.25})
    assert full.converged and full.stop_reason in ("gradient_tolerance", "step_function_tolerance")
    assert full.as_dict()["w"] == pytest.approx(0.3, rel=1e-3)
    assert full.grad_cosine < 1e-6 and full.warnings == ()


def test_changing_max_steps_or_tolerances_does_not_recompile():
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    p = S.sysid(ROT, rotation_data(), params={"w": 0.25})
    solve_least_squares(p, p.theta0, max_steps=5)  # compiled here (or earlier in the session)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for steps, tol in ((6, 1e-8), (40, 1e-9), (7, 1e-12)):
            method = pydso.LevenbergMarquardt(rtol=tol, atol=tol)
            sol = solve_least_squares(p, p.theta0, method=method, max_steps=steps)
            assert int(sol.num_steps) <= steps
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} compilation(s) after changing max_steps/rtol/atol"


def test_fit_output_on_a_bound_is_accepted_as_a_warm_start_and_intervals_respect_bounds():
    """Regression: a bounded parameter exactly on its bound (a fit's own output) was refused as a starting guess,
    and delta-method intervals crossed the bound."""
    rng = np.random.default_rng(3)
    u = rng.normal(size=(1, 80))
    y = simulate_first(0.897, 1.0, u, 0.0) + 0.5 * rng.normal(size=u.shape)
    ds = io(u, y)
    r = S.fit(BOUNDED, ds)
    a = r.as_dict()["a"]
    ia = r.names.index("a")
    assert 0.85 < a < 0.9
    assert r.ci_high[ia] < 0.9 and r.ci_low[ia] > 0.0
    assert a + 2 * r.stderr[ia] > 0.9  # the delta-method interval would have crossed the bound
    assert r.ci_low[ia] < a < r.ci_high[ia]
    on_bound = {"a": 0.9, "b": float(r.as_dict()["b"])}
    warm = S.fit(BOUNDED, ds, params=on_bound)  # used to raise "lies outside its bounds"
    assert warm.as_dict()["a"] == pytest.approx(a, rel=1e-6)
    with pytest.raises(S.SysIdError, match="outside its bounds"):
        S.fit(BOUNDED, ds, params={"a": 0.95, "b": 1.0})


def test_from_problems_import_sysid_is_the_constructor():
    from pydso.problems import sysid

    p = sysid(ROT, rotation_data())
    assert isinstance(p, S.SysIdProblem) and sysid.fit is S.fit and callable(sysid)


def test_simulate_and_score_with_an_equinox_network_in_the_parameters():
    """Regression: SysIdResult.simulate failed for hybrid (grey box + network) parameters."""
    net = eqx.nn.MLP(1, 1, 4, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))

    def f(x, u, th):
        return th["a"] * x + th["b"] * u + 0.1 * th["net"](x)

    model = S.DiscreteModel(f, None, {"a": 0.5, "b": 0.5, "net": net}, x0=[0.0])
    rng = np.random.default_rng(1)
    u = rng.normal(size=(1, 60))
    y = simulate_first(0.7, 1.0, u, 0.3)
    ds = io(u, y)
    r = S.fit(model, ds, max_steps=3)
    np.testing.assert_allclose(r.simulate(model, u[0][:, None]), r.y_sim[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.simulate(ds, x0=r.x0), r.y_sim, rtol=1e-10, atol=1e-12)
    sc = r.score(ds, x0=r.x0)
    np.testing.assert_allclose(sc.rmse, r.rmse, rtol=1e-8)


def test_divergence_advice_matches_the_loss():
    """Regression: the divergence message advised multiple shooting when the loss already was multiple shooting."""
    ds = rotation_data()
    ms = S.sysid(ROT, ds, loss=S.MultipleShooting(segment_length=10))
    with pytest.raises(pydso.DivergenceError) as err:
        ms.result(jnp.full_like(ms.theta0, jnp.nan))
    assert "multiple-shooting loss" in str(err.value) and "try multiple shooting" not in str(err.value)
    single = S.sysid(ROT, ds)
    with pytest.raises(pydso.DivergenceError, match="try multiple shooting"):
        single.result(jnp.full_like(single.theta0, jnp.nan))


def test_failing_model_factory_keeps_its_traceback(tmp_path):
    (tmp_path / "broken_models.py").write_text(
        "def helper():\n    raise KeyError('missing parameter table')\n\ndef make():\n    return helper()\n"
    )
    with pytest.raises(S.SysIdError, match=r"(?s)calling the factory failed: KeyError.*factory traceback.*helper"):
        S.load_model(f"{tmp_path / 'broken_models.py'}:make")


# ------------------------------------------------------------------------------------------------ issue 11 items
def test_non_finite_guesses_and_mismatched_time_axes_are_clear_errors():
    rng = np.random.default_rng(2)
    u = rng.normal(size=(1, 40))
    ds = io(u, simulate_first(0.5, 1.0, u, 0.0))
    with pytest.raises(S.SysIdError, match="initial guess of 'a' is not finite"):
        S.fit(FIRST, ds, params={"a": np.nan})
    with pytest.raises(S.SysIdError, match="initial guess of 'x0' is not finite"):
        S.fit(FIRST, ds, x0=[np.inf])
    with pytest.raises(S.SysIdError, match=r"starts\[0\]: initial guess of 'b' is not finite"):
        S.fit(FIRST, ds, starts=[{"b": np.nan}])
    bad = xr.Dataset(
        {
            "input": (("episode", "time_u", "input_dim"), u[..., None]),
            "output": (("episode", "time", "output_dim"), u[..., None]),
        },
        coords={"time": np.arange(40.0), "time_u": np.arange(40.0) + 0.5},
    )
    with pytest.raises(S.SysIdError, match="'input' has dimensions.*same 'time' axis"):
        S.fit(FIRST, bad)


# ------------------------------------------------------------------------------------------------ features
def test_multistart_is_one_batch_best_by_loss_and_reports_every_start():
    """Frequency fitting is multimodal: from w = 1.0 LM stalls in a local minimum; the multi-start finds the true
    w = 0.3 and reports every start (given guesses, then sampled ones)."""
    ds = rotation_data()
    r = S.fit(ROT, ds, params={"w": 1.0}, starts=[{"w": 0.6}, {"w": 0.31}], n_starts=6, key=jax.random.PRNGKey(0))
    ms = r.multistart
    assert ms.n_starts == 6 and ms.estimate.shape == (6, 1) and len(ms.message) == 6
    assert ms.best == int(np.argmin(ms.cost)) and r.cost == pytest.approx(ms.cost[ms.best], rel=1e-9)
    assert r.as_dict()["w"] == pytest.approx(0.3, rel=1e-9)
    assert abs(ms.estimate[0, 0] - 0.3) > 0.05 and ms.cost[0] > 100 * r.cost + 1e-6  # the guess alone: stuck
    np.testing.assert_allclose(ms.estimate[2, 0], 0.3, rtol=1e-9)
    with pytest.raises(S.SysIdError, match="needs key="):
        S.fit(ROT, ds, n_starts=3)
    # a sampler draws the guesses
    r2 = S.fit(
        ROT,
        ds,
        n_starts=6,
        sampler=lambda k: {"w": float(jax.random.uniform(k, minval=0.25, maxval=0.35))},
        key=jax.random.PRNGKey(1),
    )
    assert r2.multistart.n_starts == 6 and r2.as_dict()["w"] == pytest.approx(0.3, rel=1e-9)


def test_fixed_parameters_and_initial_states_without_rewriting_the_model():
    rng = np.random.default_rng(3)
    u = rng.normal(size=(2, 60))
    y = simulate_first(0.7, 1.3, u, np.array([0.4, -0.2]))
    ds = io(u, y)
    r = S.fit(FIRST, ds, fixed={"a": 0.7, "x0[0]": [0.4, -0.2]}, output_scale=1.0)
    assert r.as_dict() == pytest.approx({"a": 0.7, "b": 1.3}, rel=1e-9)
    ia = r.names.index("a")
    assert r.fixed[ia] and r.stderr[ia] == 0.0 and r.ci_low[ia] == r.ci_high[ia] == 0.7
    np.testing.assert_allclose(r.x0[:, 0], [0.4, -0.2])
    p = S.sysid(FIRST, ds, fixed=["a", "x0"])  # held at the guesses: only b is free
    assert p.theta0.shape == (1,)
    # a wrong fixed value is kept and the free parameter compensates (least squares over b alone, closed form)
    rw = S.fit(FIRST, ds, fixed={"a": 0.5, "x0": [0.4, -0.2]}, output_scale=1.0)
    phi = simulate_first(0.5, 1.0, u, 0.0)  # y is linear in b for fixed a: y = b * phi + a^k x0
    off = simulate_first(0.5, 0.0, u, np.array([0.4, -0.2]))
    b_ls = float(np.sum(phi * (y - off)) / np.sum(phi * phi))
    assert rw.as_dict()["b"] == pytest.approx(b_ls, rel=1e-8) and rw.dof == y.size - 1
    with pytest.raises(S.SysIdError, match="fixed names unknown parameter 'c'"):
        S.sysid(FIRST, ds, fixed=["c"])


def test_initial_state_transforms():
    rng = np.random.default_rng(4)
    u = rng.normal(size=(1, 50))
    y = simulate_first(0.6, 0.8, u, 2.5)
    ds = io(u, y)
    r = S.fit(FIRST, ds, transforms={"x0": "positive"}, x0=[1.0])
    assert r.x0[0, 0] == pytest.approx(2.5, rel=1e-9) and r.as_dict()["a"] == pytest.approx(0.6, rel=1e-9)
    p = S.sysid(FIRST, ds, transforms={"x0": "positive"}, x0=[1.0])
    assert float(p.theta0[-1]) == pytest.approx(0.0)  # log(1)
    with pytest.raises(S.SysIdError, match="x0.*positive transform.*<= 0"):
        S.sysid(FIRST, ds, transforms={"x0[0]": "positive"}, x0=[-1.0])
    with pytest.raises(S.SysIdError, match="unknown initial states"):
        S.sysid(FIRST, ds, transforms={"x0[3]": "positive"})


def test_validation_on_new_data_with_estimated_initial_state():
    rng = np.random.default_rng(5)
    u = rng.normal(size=(1, 80))
    est = io(u, simulate_first(0.8, 0.5, u, 0.0) + 0.01 * rng.normal(size=u.shape))
    r = S.fit(FIRST, est)
    u2 = rng.normal(size=(2, 120))
    y2 = simulate_first(0.8, 0.5, u2, np.array([3.0, -2.0]))
    val = io(u2, y2)
    sc = r.score(val, n_init=10)  # x0 estimated from the first 10 samples of each episode only
    np.testing.assert_allclose(sc.x0[:, 0], [3.0, -2.0], rtol=0.02)
    assert sc.skip == 10 and np.all(sc.fit_percent > 95.0)
    # the exact reference: simulate with the estimated parameters from the true initial states
    a, b = r.as_dict()["a"], r.as_dict()["b"]
    ref = simulate_first(a, b, u2, np.array([3.0, -2.0]))
    np.testing.assert_allclose(r.score(val, x0=np.array([[3.0], [-2.0]])).y_sim[..., 0], ref, rtol=1e-9, atol=1e-12)
    wrong = r.score(val, x0=[0.0])
    assert np.all(wrong.fit_percent < sc.fit_percent) and wrong.skip == 0
    rmse = np.sqrt(np.mean((sc.y_sim[:, 10:, 0] - y2[:, 10:]) ** 2))
    assert sc.rmse[0] == pytest.approx(rmse, rel=1e-12)


def test_weight_regularisation_is_ridge_regression_and_holdout_stops_early():
    """A static linear model y = w . u (a discrete model with a dummy state): the L2 regularisation gives the
    ridge estimate (Phi^T Phi + lambda I)^-1 Phi^T y exactly."""
    model = S.DiscreteModel(
        lambda x, u, th: x,
        lambda x, u, th: jnp.atleast_1d(th["w"] @ u),
        {"w": np.zeros(3)},
        x0=[0.0],
        estimate_x0=False,
    )
    rng = np.random.default_rng(6)
    U = rng.normal(size=(1, 40, 3))
    y = U[0] @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=40)
    ds = make_dataset(y[None, :, None], input=U, output=y[None, :, None], dt=1.0)
    lam = 7.0
    r = S.fit(model, ds, regularization={"w": lam}, output_scale=1.0)
    Phi = U[0]
    ridge = np.linalg.solve(Phi.T @ Phi + lam * np.eye(3), Phi.T @ y)
    np.testing.assert_allclose(r.estimate, ridge, rtol=1e-8)
    # holdout: early stopping returns the best holdout parameters and says so
    U2 = rng.normal(size=(1, 40, 3))
    y2 = U2[0] @ np.array([1.0, -2.0, 0.5])
    hold = make_dataset(y2[None, :, None], input=U2, output=y2[None, :, None], dt=1.0)
    re = S.fit(model, ds, holdout=hold, check_every=1, patience=2, max_steps=50)
    assert re.stop_reason == "early_stopping" and "early stopping" in re.message
    assert np.mean(re.score(hold, x0=[0.0]).rmse) <= np.mean(S.fit(model, ds, max_steps=1).score(hold, x0=[0.0]).rmse)


def test_smooth_nonlinearities_tend_to_their_hard_limits():
    @jax.jit
    def smooth(x, k):
        return {
            "max": S.smooth_max(x, 0.5, k),
            "max_tie": S.smooth_max(jnp.full_like(x, 0.5), 0.5, k),
            "min": S.smooth_min(x, -0.5, k),
            "abs": S.smooth_abs(x, k),
            "clip": S.smooth_clip(x, -1.0, 2.0, k),
            "dead": S.dead_zone(x, 1.0, k),
            "over": S.overflow(x, 1.5, k),
            "dead_grad": jax.vmap(jax.grad(lambda v: S.dead_zone(v, 1.0, k)))(x),
        }

    x = np.linspace(-3.0, 3.0, 61)
    hard = {
        "max": np.maximum(x, 0.5),
        "min": np.minimum(x, -0.5),
        "abs": np.abs(x),
        "clip": np.clip(x, -1.0, 2.0),
        "dead": x - np.clip(x, -1.0, 1.0),
        "over": np.maximum(x - 1.5, 0.0),
    }
    for k in (1.0, 10.0, 1e3):
        err = math.log(2.0) / k
        v = {n: np.asarray(a) for n, a in smooth(jnp.asarray(x), jnp.asarray(k)).items()}
        assert np.all(v["max"] >= hard["max"] - 1e-12) and np.all(v["max"] <= hard["max"] + err + 1e-12)
        np.testing.assert_allclose(v["max_tie"], 0.5 + err, rtol=1e-12)  # the worst case, exactly
        assert np.all(v["min"] <= hard["min"] + 1e-12) and np.all(v["min"] >= hard["min"] - err - 1e-12)
        assert np.all(v["abs"] >= hard["abs"] - 1e-12) and np.all(v["abs"] <= hard["abs"] + err + 1e-12)
        for name in ("clip", "dead"):
            assert np.max(np.abs(v[name] - hard[name])) <= 2 * err + 1e-12, (name, k)
        assert np.max(np.abs(v["over"] - hard["over"])) <= err + 1e-12
        assert np.all(np.isfinite(v["dead_grad"]))
    # sharp: exact to rounding away from the kinks; the gradient is 1 outside the dead zone and 0 inside
    assert v["clip"][-1] == pytest.approx(2.0, abs=1e-12)
    assert v["dead_grad"][0] == pytest.approx(1.0) and v["dead_grad"][30] == pytest.approx(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(S.smooth_max(1e3, -1e3, 1e3)) == pytest.approx(1e3)  # no overflow in softplus
