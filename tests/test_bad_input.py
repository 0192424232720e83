"""Bad input gets a clear error that names the problem; nothing is broadcast silently."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
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
    with pytest.raises(pydso.ProblemError, match="wrong pytree structure"):
        pydso.rollout(linear_chain(), {"b": jnp.eye(2)}, key=KEY, n=2)


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5, float("nan")])
def test_gamma_outside_unit_interval(gamma):
    with pytest.raises(pydso.ProblemError, match=r"gamma must lie in \(0, 1\]"):
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
    with pytest.raises(pydso.ProblemError, match="terminal sets are supported for discrete-time chains only"):
        pydso.Problem(
            oscillator().system,
            lambda x, th: 0.0,
            pydso.Episodic(0.9, 5, terminal=lambda x: x[0] > 1),
            pydso.Fixed(jnp.zeros(2)),
        )


def test_bad_ode_step():
    with pytest.raises(pydso.ProblemError, match="ODESystem.dt must be a positive finite number"):
        pydso.ODESystem(lambda t, x, th: x, dt=-0.1)


def test_theta_example_is_checked_at_construction():
    with pytest.raises(pydso.ProblemError, match="wrong pytree structure"):
        pydso.Problem(
            pydso.GaussianChain(lambda x, th: th["a"] @ x, 0.1),
            lambda x, th: x @ x,
            pydso.Episodic(0.9, 20),
            pydso.Normal(jnp.zeros(2), 1.0),
            theta_example=[1.0],
        )
