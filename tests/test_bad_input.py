"""Bad input gets a clear error that names the problem; nothing is broadcast silently."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pydso

KEY = jax.random.key(0)


def oscillator(dim=2):
    def field(t, x, k):
        return jnp.array([x[1], -k * x[0]])

    return pydso.Problem(
        pydso.ODESystem(field, dt=0.1), lambda x, k: x @ x, pydso.FiniteHorizon(10), pydso.Normal(jnp.zeros(dim), 1.0)
    )


def linear_chain():
    return pydso.Problem(
        pydso.GaussianChain(lambda x, th: th["a"] @ x, 0.1),
        lambda x, th: x @ x,
        pydso.Episodic(0.9, 20),
        pydso.Normal(jnp.zeros(2), 1.0),
    )


THETA = {"a": 0.5 * jnp.eye(2)}


def test_state_shape_mismatch_between_x0_and_vector_field():
    with pytest.raises(pydso.ProblemError, match=r"vector_field\(t, x, theta\) returns shape \(2,\) but the initial"):
        pydso.rollout(oscillator(dim=3), 1.0, key=KEY, n=4)


def test_transition_output_shape_mismatch_is_not_broadcast():
    problem = pydso.Problem(
        pydso.DeterministicMap(lambda x, th: th * x[:1]),
        lambda x, th: jnp.sum(x**2),
        pydso.Episodic(0.9, 5),
        pydso.Fixed(jnp.ones(3)),
    )
    with pytest.raises(pydso.ProblemError, match="never broadcasts"):
        pydso.rollout(problem, 2.0, key=KEY, n=2)


def test_non_finite_theta():
    with pytest.raises(pydso.ProblemError, match=r"theta\['a'\] contains non-finite"):
        pydso.rollout(linear_chain(), {"a": jnp.array([[jnp.nan, 0.0], [0.0, 1.0]])}, key=KEY, n=2)


def test_wrong_pytree_structure_of_theta():
    with pytest.raises(pydso.ProblemError, match=r"theta.*pytree structure"):
        pydso.rollout(linear_chain(), {"b": jnp.eye(2)}, key=KEY, n=2)


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5, float("nan")])
def test_gamma_outside_unit_interval(gamma):
    with pytest.raises(pydso.ProblemError, match=r"gamma must (lie|be a number) in \(0, 1\]"):
        pydso.Episodic(gamma, 10)


@pytest.mark.parametrize("horizon", [-1, 0, 2.5, True])
def test_bad_horizon(horizon):
    with pytest.raises(pydso.ProblemError, match="horizon must be a positive integer"):
        pydso.Episodic(0.9, horizon)


def test_missing_key():
    with pytest.raises(pydso.ProblemError, match="PRNG key is required"):
        pydso.rollout(linear_chain(), THETA, key=None, n=2)


def test_key_of_wrong_type():
    with pytest.raises(pydso.ProblemError, match="key must be a JAX PRNG key"):
        pydso.rollout(linear_chain(), THETA, key=42, n=2)


def test_non_positive_episode_count():
    with pytest.raises(pydso.ProblemError, match="n must be a positive integer"):
        pydso.rollout(linear_chain(), THETA, key=KEY, n=0)


def test_diverging_ode_solve_is_reported():
    # Finite-time blow-up x' = x^2 from x0 = 1 at t = 1, adaptive solver: the solve fails before t = 2.
    problem = pydso.Problem(
        pydso.ODESystem(
            lambda t, x, th: th * x**2,
            dt=0.1,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            max_steps=500,
        ),
        lambda x, th: jnp.sum(x),
        pydso.FiniteHorizon(20),
        pydso.Fixed(jnp.ones(1)),
    )
    with pytest.raises(pydso.DivergenceError, match="rollout diverged: non-finite state in episode 0"):
        pydso.rollout(problem, 1.0, key=KEY, n=1)


def test_diverging_chain_is_reported():
    problem = pydso.Problem(
        pydso.DeterministicMap(lambda x, th: th * x**3),
        lambda x, th: jnp.sum(x),
        pydso.Episodic(1.0, 30),
        pydso.Fixed(jnp.full(1, 2.0)),
    )
    with pytest.raises(pydso.DivergenceError, match="non-finite state"):
        pydso.rollout(problem, 3.0, key=KEY, n=1)


def test_cost_must_be_scalar():
    problem = pydso.Problem(
        pydso.GaussianChain(lambda x, th: th["a"] @ x, 0.1),
        lambda x, th: x**2,
        pydso.Episodic(0.9, 20),
        pydso.Normal(jnp.zeros(2), 1.0),
    )
    with pytest.raises(pydso.ProblemError, match="cost.*must return a scalar, got shape"):
        pydso.rollout(problem, THETA, key=KEY, n=2)


def test_score_estimator_needs_a_density():
    with pytest.raises(pydso.ProblemError, match="needs a transition log-density"):
        pydso.score_gradient(oscillator(), 1.0, key=KEY, n=4)


def test_pathwise_estimator_needs_reparameterisation():
    chain = pydso.TabularChain(lambda th: jax.nn.softmax(th, axis=1))
    problem = pydso.Problem(chain, lambda x, th: 1.0 * x, pydso.Episodic(0.9, 10), pydso.Categorical(jnp.ones(2) / 2))
    with pytest.raises(pydso.ProblemError, match="needs reparameterised dynamics"):
        pydso.pathwise_gradient(problem, jnp.zeros((2, 2)), key=KEY, n=4)


def test_unknown_estimator_name():
    with pytest.raises(pydso.ProblemError, match="unknown estimator 'reinforce'"):
        pydso.minimize(linear_chain(), THETA, key=KEY, steps=1, method=pydso.Gradient(estimator="reinforce"))


def test_optimizer_must_be_optax():
    with pytest.raises(pydso.ProblemError, match="optax GradientTransformation"):
        pydso.minimize(linear_chain(), THETA, key=KEY, steps=1, method=pydso.Gradient(optimizer="adam"))


def test_bad_initial_distributions():
    with pytest.raises(pydso.ProblemError, match="Uniform.high must be >= Uniform.low"):
        pydso.Uniform([1.0, 0.0], [0.0, 1.0])
    with pytest.raises(pydso.ProblemError, match="Uniform.low shape"):
        pydso.Uniform([0.0, 0.0], [1.0])
    with pytest.raises(pydso.ProblemError, match="Categorical.probs must be a 1-D probability vector"):
        pydso.Categorical([0.5, 0.6])
    with pytest.raises(pydso.ProblemError, match="Normal.mean contains non-finite"):
        pydso.Normal([np.nan], 1.0)


def test_problem_parts_of_wrong_type():
    with pytest.raises(pydso.ProblemError, match="system must be a pydso system"):
        pydso.Problem(lambda x: x, lambda x, th: 0.0, pydso.Episodic(), pydso.Fixed(0.0))
    with pytest.raises(pydso.ProblemError, match="setting must be Episodic"):
        pydso.Problem(pydso.DeterministicMap(lambda x, th: x), lambda x, th: 0.0, 0.9, pydso.Fixed(0.0))
    with pytest.raises(pydso.ProblemError, match="terminal_cost must be a callable"):
        pydso.Problem(
            pydso.DeterministicMap(lambda x, th: x),
            lambda x, th: 0.0,
            pydso.Episodic(),
            pydso.Fixed(0.0),
            terminal_cost=1.0,
        )


def test_bad_ode_step():
    with pytest.raises(pydso.ProblemError, match="ODESystem.dt must be a positive finite number"):
        pydso.ODESystem(lambda t, x, th: x, dt=-0.1)


def test_theta_example_is_checked_at_construction():
    with pytest.raises(pydso.ProblemError, match=r"theta.*pytree structure"):
        pydso.Problem(
            pydso.GaussianChain(lambda x, th: th["a"] @ x, 0.1),
            lambda x, th: x @ x,
            pydso.Episodic(0.9, 20),
            pydso.Normal(jnp.zeros(2), 1.0),
            theta_example=[1.0],
        )


# ------------------------------------------------------------------------------------------- counts and paths
def _cheap_problem(c=1.0, gain=1.0, gamma=0.9, mean=0.0):
    return pydso.Problem(
        pydso.DeterministicMap(lambda x, th: gain * th * x),
        lambda x, th: c * jnp.sum(x**2),
        pydso.Episodic(gamma, 3),
        pydso.Normal(jnp.full(1, mean), 1.0),
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, r"steps must be a positive integer, got 0"),
        ({"steps": -1}, r"steps must be a positive integer, got -1"),
        ({"checkpoint_every": 0}, r"checkpoint_every must be a positive integer, got 0"),
        ({"method": "adam"}, r"method must be a pydso.optimize method"),
        ({"method": None}, r"method must be a pydso.optimize method"),
    ],
    ids=["steps-zero", "steps-negative", "checkpoint-every", "method-string", "method-none"],
)
def test_minimize_bad_arguments(kwargs, match):
    with pytest.raises(pydso.ProblemError, match=match):
        pydso.minimize(_cheap_problem(), jnp.asarray(0.5), key=KEY, **{"steps": 1, **kwargs})


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_gradient_method_bad_n(n):
    with pytest.raises(pydso.ProblemError, match=r"n must be a positive integer"):
        pydso.Gradient(n=n)


def test_gradient_method_with_one_episode_warns_that_stderr_is_undefined():
    with pytest.warns(UserWarning, match=r"Gradient\(n=1\): one episode per step gives no standard error"):
        pydso.Gradient(n=1)


def test_minimize_non_finite_initial_theta():
    with pytest.raises(pydso.ProblemError, match=r"theta contains non-finite"):
        pydso.minimize(_cheap_problem(), jnp.asarray(jnp.nan), key=KEY, steps=1)


def test_checkpoint_path_is_a_directory_refused_before_work(tmp_path):
    with pytest.raises(pydso.ProblemError, match=r"checkpoint: .* is a directory; give a file path"):
        pydso.minimize(_cheap_problem(), jnp.asarray(0.5), key=KEY, steps=1, checkpoint=tmp_path)


def test_checkpoint_below_a_file_refused_before_work(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(pydso.ProblemError, match=r"checkpoint: cannot write .*/f' is a file, not a directory"):
        pydso.minimize(_cheap_problem(), jnp.asarray(0.5), key=KEY, steps=1, checkpoint=tmp_path / "f" / "run.npz")


def test_checkpoint_path_of_wrong_type():
    with pytest.raises(pydso.ProblemError, match=r"checkpoint must be a path \(str or os.PathLike\), got int"):
        pydso.minimize(_cheap_problem(), jnp.asarray(0.5), key=KEY, steps=1, checkpoint=3)


def test_record_path_is_a_file_refused_before_simulation(tmp_path):
    (tmp_path / "f").write_text("user data")
    with pytest.raises(pydso.ProblemError, match=r"record: .*/f' is a file, not a directory"):
        pydso.rollout(linear_chain(), THETA, key=KEY, n=2, record=tmp_path / "f")
    assert (tmp_path / "f").read_text() == "user data"


def test_record_into_a_users_directory_refused_before_simulation(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("user data")
    with pytest.raises(pydso.ProblemError, match=r"record: .*results' is a directory but not a pydso trajectory store"):
        pydso.rollout(linear_chain(), THETA, key=KEY, n=2, record=tmp_path / "results")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["notes.txt"]


def test_record_below_a_file_refused_before_simulation(tmp_path):
    (tmp_path / "f").write_text("user data")
    with pytest.raises(pydso.ProblemError, match=r"record: cannot create .*/f' is a file"):
        pydso.rollout(linear_chain(), THETA, key=KEY, n=2, record=tmp_path / "f" / "store")


# ------------------------------------------------------------------------------------------- resume fingerprint
@pytest.mark.parametrize(
    "changed, match",
    [
        (dict(problem=_cheap_problem(c=2.0)), r"the cost changed"),
        (dict(problem=_cheap_problem(gain=1.5)), r"the system \(dynamics\) changed"),
        (dict(problem=_cheap_problem(gamma=0.5)), r"the setting \(horizon, discount, terminal set\) changed"),
        (dict(problem=_cheap_problem(mean=1.0)), r"the initial distribution changed"),
        (dict(optimizer=optax.adam(2e-2)), r"the method's optimizer \(hyperparameters such as the learning rate"),
        (dict(optimizer=optax.adam(1e-2, b1=0.8)), r"the method's optimizer"),
        (dict(n=16), r"the method's n \(episodes per step\) changed"),
    ],
    ids=["cost", "system", "setting", "initial", "learning-rate", "adam-b1", "n"],
)
def test_resume_with_changed_problem_or_settings_says_what_changed(tmp_path, changed, match):
    """A checkpoint written by one run (written directly: no step is simulated) is refused by a run that differs in
    one part, with a message naming that part."""
    from pydso.optimize import Checkpoint, save_checkpoint
    from pydso.optimize._checkpoint import run_fingerprint

    theta = jnp.asarray(0.5)
    method = pydso.Gradient(optax.adam(1e-2), n=8)
    problem = _cheap_problem()
    state = method.init(problem, theta)
    path = tmp_path / "run.npz"
    save_checkpoint(
        path,
        Checkpoint(theta, state, theta, 1.0, {"objective": [1.0]}, 1),
        key=KEY,
        fingerprint=run_fingerprint(problem, theta, method),
    )
    other_problem = changed.get("problem", _cheap_problem())
    other = pydso.Gradient(changed.get("optimizer", optax.adam(1e-2)), n=changed.get("n", 8))
    with pytest.raises(pydso.ProblemError, match=match) as info:
        pydso.minimize(other_problem, theta, key=KEY, steps=2, method=other, checkpoint=path)
    assert "does not match this run" in str(info.value)


# ------------------------------------------------------------------------------------------- divergence
def _exploding_chain():
    return pydso.Problem(
        pydso.DeterministicMap(lambda x, th: th * x**3),
        lambda x, th: jnp.sum(x),
        pydso.Episodic(1.0, 30),
        pydso.Fixed(jnp.full(1, 2.0)),
    )


def test_pathwise_estimator_raises_the_rollout_divergence_naming_episode_and_step():
    with pytest.raises(pydso.DivergenceError, match=r"rollout diverged: non-finite state in episode 0 at step \d+"):
        pydso.pathwise_gradient(_exploding_chain(), jnp.asarray(3.0), key=KEY, n=2)


def test_estimator_with_overflowing_cost_names_episode_and_step():
    problem = pydso.Problem(
        pydso.DeterministicMap(lambda x, th: th * x),
        lambda x, th: jnp.exp(300.0 * th * jnp.sum(x)),
        pydso.Episodic(1.0, 4),
        pydso.Fixed(jnp.full(1, 2.0)),
    )
    with pytest.raises(
        pydso.DivergenceError, match=r"Pathwise estimate diverged.*step cost is non-finite in episode 0"
    ):
        pydso.pathwise_gradient(problem, jnp.asarray(3.0), key=KEY, n=2)


def test_estimator_with_one_episode_warns():
    with pytest.warns(UserWarning, match=r"n=1: a standard error needs at least two episodes"):
        est = pydso.pathwise_gradient(_cheap_problem(), jnp.asarray(0.5), key=KEY, n=1)
    assert np.isnan(float(est.objective_stderr)) and np.isfinite(float(est.objective))


def _cube_moments() -> optax.GradientTransformation:
    """An optimiser whose state (sum of g**3) overflows although the gradient and its norm are finite."""

    def init(params):
        return jnp.zeros_like(params)

    def update(g, state, params=None):
        return -1e-300 * g, state + g**3

    return optax.GradientTransformation(init, update)


def test_minimize_stops_when_the_optimizer_state_overflows_with_a_finite_gradient():
    problem = pydso.Problem(
        pydso.DeterministicMap(lambda x, th: x),
        lambda x, th: 1e120 * th * jnp.sum(x),  # gradient 1e120 * 2: finite, its square too; its cube is not
        pydso.Episodic(1.0, 1),
        pydso.Fixed(jnp.full(1, 1.0)),
    )
    theta = jnp.asarray(0.25)
    with pytest.raises(
        pydso.DivergenceError, match=r"step 0: the method's state \(optimiser moments\) overflowed"
    ) as info:
        pydso.minimize(problem, theta, key=KEY, steps=3, method=pydso.Gradient(_cube_moments(), n=2))
    assert float(info.value.best_theta) == 0.25


def test_minimize_stops_when_a_finite_gradient_overflows_adam():
    """A gradient of 2.8e279 is finite, but Adam's second moment (its square) is inf and every update 0: stop."""
    problem = pydso.Problem(
        pydso.DeterministicMap(lambda x, th: x),
        lambda x, th: 2.8e279 * th * jnp.sum(x),
        pydso.Episodic(1.0, 1),
        pydso.Fixed(jnp.full(1, 1.0)),
    )
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes an int32 count into float64 maths
        with pytest.raises(
            pydso.DivergenceError, match=r"diverged at step 0: the method.s state \(optimiser moments\) overflowed"
        ) as info:
            pydso.minimize(problem, jnp.asarray(0.25), key=KEY, steps=3, method=pydso.Gradient(optax.adam(1e-2), n=2))
    assert float(info.value.best_theta) == 0.25


def test_minimize_divergence_names_the_episode_and_step_of_the_rollout():
    with pytest.raises(
        pydso.DivergenceError, match=r"minimize diverged at step 0.*non-finite state in episode \d+ at step"
    ) as info:
        pydso.minimize(
            _exploding_chain(), jnp.asarray(3.0), key=KEY, steps=2, method=pydso.Gradient(optax.sgd(1e-3), n=2)
        )
    assert float(info.value.best_theta) == 3.0
