"""Bad input at the system level (issue 11): every case asserts the error type AND that the message names the
offending argument. Noise scales, transition matrices, settings' scalar types, dtypes of the initial state and theta,
dimension mismatches, and the fixed-step stability warning."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pydso
from pydso import exact

KEY = jax.random.key(0)


def _cost(x, th):
    return jnp.sum(x**2)


# ------------------------------------------------------------------------------------------ noise scales
@pytest.mark.parametrize("scale", [0.0, -1.0, [1.0, 0.0], np.nan])
def test_gaussian_chain_constant_scale_must_be_positive(scale):
    with pytest.raises(pydso.ProblemError, match="scale"):
        pydso.GaussianChain(lambda x, th: x, scale)


def test_gaussian_chain_callable_scale_negative_at_run_time_is_named():
    # positive at the initial state (so construction and check_theta pass), negative once |x| > 0.1
    chain = pydso.GaussianChain(lambda x, th: th * x, lambda x, th: 1.0 - 10.0 * jnp.abs(x))
    problem = pydso.Problem(chain, _cost, pydso.Episodic(0.9, 5), pydso.Fixed(jnp.zeros(1)))
    with pytest.raises(pydso.ProblemError, match=r"GaussianChain\.scale .*not positive.*episode \d+ at step \d+"):
        pydso.rollout(problem, 0.5, key=KEY, n=4)


def test_gaussian_chain_callable_scale_negative_at_initial_state_is_named_by_check_theta():
    chain = pydso.GaussianChain(lambda x, th: x, lambda x, th: -jnp.ones_like(x))
    with pytest.raises(pydso.ProblemError, match=r"GaussianChain\.scale"):
        pydso.Problem(chain, _cost, pydso.Episodic(0.9, 5), pydso.Fixed(jnp.zeros(2)), theta_example=1.0)


def _sde(diffusion):
    return pydso.SDESystem(lambda t, x, th: -x, diffusion, dt=0.1)


def test_sde_negative_diffusion_is_named_by_check_theta():
    with pytest.raises(pydso.ProblemError, match="diffusion"):
        pydso.Problem(
            _sde(lambda t, x, th: th * jnp.ones_like(x)),
            _cost,
            pydso.Episodic(0.9, 5),
            pydso.Fixed(jnp.ones(2)),
            theta_example=-0.5,
        )


def test_sde_negative_diffusion_at_run_time_is_named():
    # non-negative at x0 = 0, negative after the first steps
    problem = pydso.Problem(
        _sde(lambda t, x, th: th - 10.0 * jnp.abs(x)), _cost, pydso.Episodic(0.9, 10), pydso.Fixed(jnp.zeros(2))
    )
    with pytest.raises(pydso.ProblemError, match=r"SDESystem\.diffusion .*negative"):
        pydso.rollout(problem, 0.05, key=KEY, n=8)


# ------------------------------------------------------------------------------------------ tabular rows
@pytest.mark.parametrize("P", [[[0.5, 0.6], [0.5, 0.5]], [[1.2, -0.2], [0.5, 0.5]]], ids=["row-sum", "negative"])
def test_tabular_rows_must_be_probability_vectors_in_rollout_and_exact(P):
    problem = pydso.Problem(
        pydso.TabularChain(lambda th: th * jnp.asarray(P)),
        lambda x, th: jnp.asarray(1.0),
        pydso.Episodic(0.9, 5),
        pydso.Categorical([0.5, 0.5]),
    )
    with pytest.raises(pydso.ProblemError, match="transition_fn.*row-stochastic"):
        pydso.rollout(problem, jnp.asarray(1.0), key=KEY, n=2)
    with pytest.raises(pydso.ProblemError, match="row-stochastic"):
        exact.objective(problem, jnp.asarray(1.0))


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("gamma", [jnp.float64(0.9), np.float32(0.9), np.float64(0.9), jnp.asarray(0.9)])
def test_episodic_accepts_numpy_and_jax_scalars(gamma):
    setting = pydso.Episodic(gamma=gamma, horizon=np.int64(7))
    assert isinstance(setting.gamma, float) and abs(setting.gamma - 0.9) < 1e-6 and setting.horizon == 7
    w, w_end = setting.weights()
    np.testing.assert_allclose(w, setting.gamma ** np.arange(7))


@pytest.mark.parametrize("gamma", [0.0, 1.5, True, "0.9", jnp.array([0.9, 0.8])])
def test_episodic_rejects_bad_gamma_naming_it(gamma):
    with pytest.raises(pydso.ProblemError, match=r"Episodic\.gamma"):
        pydso.Episodic(gamma=gamma)


# ------------------------------------------------------------------------------------------ dtypes, dims
def _ode(dim=2):
    A = -jnp.eye(dim)
    return pydso.ODESystem(lambda t, x, th: th * (A @ x), dt=0.1)


def test_integer_initial_state_for_continuous_system_names_initial():
    with pytest.raises(pydso.ProblemError, match="initial.*floating"):
        pydso.Problem(_ode(), _cost, pydso.Episodic(0.9, 5), pydso.Fixed(jnp.array([1, 2])))


def test_integer_theta_leaf_names_theta():
    problem = pydso.Problem(_ode(), _cost, pydso.Episodic(0.9, 5), pydso.Fixed(jnp.array([1.0, 2.0])))
    with pytest.raises(pydso.ProblemError, match=r"theta\['gain'\].*integer"):
        pydso.rollout(problem, {"gain": jnp.asarray(2)}, key=KEY, n=1)


def test_initial_dimension_mismatch_is_blamed_on_initial():
    with pytest.raises(pydso.ProblemError, match="initial") as info:
        pydso.Problem(_ode(2), _cost, pydso.Episodic(0.9, 5), pydso.Normal(jnp.zeros(3), 1.0), theta_example=1.0)
    assert "shape (3,)" in str(info.value)
    chain = pydso.GaussianChain(lambda x, th: th * x[:2])
    with pytest.raises(pydso.ProblemError, match="initial"):
        pydso.Problem(chain, _cost, pydso.Episodic(0.9, 5), pydso.Fixed(jnp.zeros(3)), theta_example=1.0)


# ------------------------------------------------------------------------------------------ stability
def _stiff_problem(dt, solver=None):
    kwargs = {} if solver is None else {"solver": solver}
    system = pydso.ODESystem(lambda t, x, th: -th * x, dt=dt, **kwargs)
    return pydso.Problem(system, _cost, pydso.FiniteHorizon(5), pydso.Fixed(jnp.ones(2)))


def test_fixed_step_outside_stability_region_warns():
    # lambda dt = -100 * 0.03 = -3: outside RK4's real-axis interval [-2.785, 0], inside Tsit5's ([-3.5, 0])
    with pytest.warns(pydso.StabilityWarning, match="dt=0.03.*RK4"):
        pydso.rollout(_stiff_problem(0.03, pydso.RK4()), 100.0, key=KEY, n=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pydso.StabilityWarning)
        pydso.rollout(_stiff_problem(0.03), 100.0, key=KEY, n=1)  # Tsit5 is stable here
        pydso.rollout(_stiff_problem(0.02, pydso.RK4()), 100.0, key=KEY, n=1)  # -2.0 is inside
    with pytest.warns(pydso.StabilityWarning, match="Tsit5"):
        traj = pydso.rollout(_stiff_problem(0.05), 100.0, key=KEY, n=1)  # -5: the solution grows, wrongly
    assert abs(float(traj.states[0, -1, 0])) > 1.0


def test_structural_checks_are_cached_per_theta_signature_but_values_are_always_checked():
    """check_theta remembers which theta signatures (structure, shapes, dtypes) passed the abstract evaluation of a
    problem; a new signature is still checked, and value checks (finiteness) run on every call."""
    problem = pydso.Problem(
        pydso.DeterministicMap(lambda x, th: th["a"] @ x),
        lambda x, th: x @ x,
        pydso.Episodic(gamma=0.9, horizon=5),
        pydso.Fixed(jnp.ones(2)),
    )
    good = {"a": jnp.eye(2)}
    problem.check_theta(good)
    problem.check_theta(good)  # cached signature: passes again
    with pytest.raises(pydso.ProblemError, match="theta"):
        problem.check_theta({"a": jnp.eye(3)})  # new signature: evaluated, and wrong
    with pytest.raises(pydso.ProblemError, match="theta"):
        problem.check_theta({"a": jnp.full((2, 2), jnp.nan)})  # cached signature, but a NaN value
