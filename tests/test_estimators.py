"""Monte-Carlo gradient estimators against closed-form and exact references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from closed_form import double_integrator
from helpers import assert_tree_allclose

import pydso
import pydso.exact


def within_standard_errors(estimate, exact, k=4.0):
    est = np.asarray(estimate.gradient)
    se = np.asarray(estimate.stderr)
    err = np.abs(est - np.asarray(exact))
    assert np.all(err <= k * se), f"estimate {est} vs exact {np.asarray(exact)}: |err| {err} > {k} s.e. {k * se}"


LQR = double_integrator()
K_TEST = jnp.array([[0.8, 1.5]])


def test_lqr_closed_form_objective_matches_monte_carlo():
    traj = pydso.rollout(LQR.problem(), K_TEST, key=jax.random.key(0), n=4000)
    mc, se = float(jnp.mean(traj.objective)), float(jnp.std(traj.objective) / np.sqrt(4000))
    assert abs(mc - float(LQR.objective(K_TEST))) < 4 * se


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pathwise_gradient_lqr_within_4_standard_errors(seed):
    est = pydso.pathwise_gradient(LQR.problem(), K_TEST, key=jax.random.key(seed), n=512)
    within_standard_errors(est, LQR.gradient(K_TEST))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_gradient_lqr_within_4_standard_errors(seed):
    est = pydso.score_gradient(
        LQR.problem(), K_TEST, key=jax.random.key(seed), n=2048, baseline=pydso.StateValueBaseline()
    )
    within_standard_errors(est, LQR.gradient(K_TEST))


def test_baselines_cut_variance_of_score_gradient():
    problem, key, n = LQR.problem(), jax.random.key(7), 1024
    se = {
        name: float(jnp.linalg.norm(pydso.score_gradient(problem, K_TEST, key=key, n=n, baseline=b).stderr))
        for name, b in [
            ("none", pydso.NoBaseline()),
            ("mean", pydso.MeanBaseline()),
            ("value", pydso.StateValueBaseline()),
        ]
    }
    # Same episodes (same key) for all three: only the baseline differs.
    assert se["mean"] < 0.8 * se["none"], se
    assert se["value"] < 0.5 * se["none"], se


def test_exact_value_baseline_is_unbiased_and_lowest_variance():
    problem = LQR.problem()

    def value(x, K):  # V(x) = x'Px + c: the exact state value
        P = LQR.value_matrix(K)
        return x @ P @ x + LQR.gamma * LQR.sigma**2 * jnp.trace(P) / (1 - LQR.gamma)

    est = pydso.score_gradient(problem, K_TEST, key=jax.random.key(3), n=1024, baseline=pydso.StateValueBaseline(value))
    within_standard_errors(est, LQR.gradient(K_TEST))
    plain = pydso.score_gradient(problem, K_TEST, key=jax.random.key(3), n=1024, baseline=pydso.NoBaseline())
    assert float(jnp.linalg.norm(est.stderr)) < 0.3 * float(jnp.linalg.norm(plain.stderr))


def test_pathwise_and_score_agree_on_lqr():
    p = pydso.pathwise_gradient(LQR.problem(), K_TEST, key=jax.random.key(11), n=512)
    s = pydso.score_gradient(LQR.problem(), K_TEST, key=jax.random.key(12), n=2048, baseline=pydso.StateValueBaseline())
    diff = np.asarray(p.gradient - s.gradient)
    se = np.sqrt(np.asarray(p.stderr) ** 2 + np.asarray(s.stderr) ** 2)
    assert np.all(np.abs(diff) <= 4 * se)


def test_pathwise_gradient_through_ode_matches_finite_differences():
    # Damped oscillator with feedback gain theta; cost integrated with the state by diffrax.
    def field(t, x, k):
        return jnp.array([x[1], -k[0] * x[0] - k[1] * x[1]])

    problem = pydso.Problem(
        pydso.ODESystem(field, dt=0.05),
        lambda x, k: x @ x + 0.1 * (k[0] * x[0]) ** 2,
        pydso.FiniteHorizon(60),
        pydso.Normal(jnp.array([1.0, 0.0]), 0.2),
    )
    k = jnp.array([2.0, 0.5])
    est = pydso.pathwise_gradient(problem, k, key=jax.random.key(0), n=16)

    def mean_objective(k):
        return float(jnp.mean(pydso.rollout(problem, k, key=jax.random.key(0), n=16).objective))

    h = 1e-6
    fd = np.array([(mean_objective(k + h * e) - mean_objective(k - h * e)) / (2 * h) for e in np.eye(2)])
    np.testing.assert_allclose(np.asarray(est.gradient), fd, rtol=1e-6)


def _damped_sde():
    """dx = -a x dt + 0.3 dW in 2-d, cost |x|^2 + 0.1 a^2, 50 Euler-Maruyama steps."""
    return pydso.Problem(
        pydso.SDESystem(lambda t, x, a: -a * x, lambda t, x, a: 0.3 * jnp.ones_like(x), dt=0.02),
        lambda x, a: jnp.sum(x**2) + 0.1 * a**2,
        pydso.FiniteHorizon(50),
        pydso.Normal(jnp.ones(2), 0.1),
    )


def test_pathwise_gradient_sde_matches_common_random_number_differences():
    problem = _damped_sde()
    a = jnp.asarray(1.5)
    est = pydso.pathwise_gradient(problem, a, key=jax.random.key(4), n=32)
    f = lambda a: float(jnp.mean(pydso.rollout(problem, a, key=jax.random.key(4), n=32).objective))
    h = 1e-6
    np.testing.assert_allclose(float(est.gradient), (f(a + h) - f(a - h)) / (2 * h), rtol=1e-5)


def test_estimates_are_reproducible_for_the_same_key():
    a = pydso.score_gradient(LQR.problem(), K_TEST, key=jax.random.key(5), n=64)
    b = pydso.score_gradient(LQR.problem(), K_TEST, key=jax.random.key(5), n=64)
    np.testing.assert_array_equal(np.asarray(a.gradient), np.asarray(b.gradient))


# ------------------------------------------------------------------ tabular chains against pydso.exact
def _with_setting(problem, setting):
    return pydso.Problem(problem.system, problem.cost, setting, problem.initial, name=problem.name)


def _flat_check(estimate, exact_grad, k=4.0):
    est = jax.flatten_util.ravel_pytree(estimate.gradient)[0]
    se = jax.flatten_util.ravel_pytree(estimate.stderr)[0]
    ref = jax.flatten_util.ravel_pytree(exact_grad)[0]
    err = np.abs(np.asarray(est - ref))
    assert np.all(err <= k * np.asarray(se)), f"max |err|/se = {np.max(err / np.asarray(se)):.2f}"


@pytest.mark.parametrize("seed,S,gamma", [(0, 3, 0.9), (1, 5, 0.9), (2, 4, 0.95)])
def test_score_gradient_on_random_tabular_chains_matches_exact(seed, S, gamma):
    import jax.flatten_util  # noqa: F401
    from helpers import random_tabular_problem

    problem, theta = random_tabular_problem(seed, S, gamma=gamma)
    horizon = int(np.ceil(np.log(1e-9) / np.log(gamma)))  # truncation bias below 1e-9 relative
    problem = _with_setting(problem, pydso.Episodic(gamma, horizon))
    exact = pydso.exact.gradient(problem, theta)
    est = pydso.score_gradient(problem, theta, key=jax.random.key(seed), n=2000)
    _flat_check(est, exact)
    # The objective estimate is the exact J within its standard error too.
    assert abs(float(est.objective) - float(pydso.exact.objective(problem, theta))) < 4 * float(est.objective_stderr)


def test_tabular_value_baseline_with_one_hot_features_cuts_variance():
    import jax.flatten_util  # noqa: F401
    from helpers import random_tabular_problem

    S = 6
    base, theta = random_tabular_problem(5, S, gamma=0.9)
    # A large state-dependent offset makes returns far from zero: the regime where baselines matter.
    offset = jnp.linspace(5.0, 15.0, S)
    problem = pydso.Problem(
        base.system, lambda x, th: base.cost(x, th) + offset[x], pydso.Episodic(0.9, 200), base.initial
    )
    exact = pydso.exact.gradient(problem, theta)
    key = jax.random.key(9)
    plain = pydso.score_gradient(problem, theta, key=key, n=1000, baseline=pydso.NoBaseline())
    fitted = pydso.score_gradient(
        problem, theta, key=key, n=1000, baseline=pydso.StateValueBaseline(features=lambda x, t: jax.nn.one_hot(x, S))
    )
    _flat_check(fitted, exact)
    norm = lambda e: float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(e.stderr)[0]))
    assert norm(fitted) < 0.5 * norm(plain)


def test_score_gradient_average_cost_matches_exact():
    import jax.flatten_util  # noqa: F401
    from helpers import random_tabular_problem

    problem, theta = random_tabular_problem(3, 4, average=True)
    problem = _with_setting(problem, pydso.AverageCost(horizon=400, burn_in=40))
    exact = pydso.exact.gradient(problem, theta)
    est = pydso.score_gradient(problem, theta, key=jax.random.key(0), n=2000)
    _flat_check(est, exact)


def test_backsolve_adjoint_gradient_agrees_with_checkpointed_adjoint():
    import diffrax

    def problem(adjoint):
        return pydso.Problem(
            pydso.ODESystem(lambda t, x, k: jnp.array([x[1], -k[0] * x[0] - k[1] * x[1]]), dt=0.05, adjoint=adjoint),
            lambda x, k: x @ x,
            pydso.FiniteHorizon(40),
            pydso.Normal(jnp.array([1.0, 0.0]), 0.2),
        )

    k = jnp.array([2.0, 0.5])
    a = pydso.pathwise_gradient(problem(diffrax.RecursiveCheckpointAdjoint()), k, key=jax.random.key(0), n=4).gradient
    b = pydso.pathwise_gradient(problem(diffrax.BacksolveAdjoint()), k, key=jax.random.key(0), n=4).gradient
    # Continuous adjoint (optimise-then-discretise) vs exact discrete gradient: equal up to the solver error.
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3)


def test_score_and_pathwise_agree_on_an_sde_with_theta_dependent_cost():
    # The Euler-Maruyama running cost is L dt per step; the score estimator must re-evaluate it the same way.
    problem = pydso.Problem(
        pydso.SDESystem(lambda t, x, a: -x, lambda t, x, a: 0.5, dt=0.1),
        lambda x, a: a * jnp.sum(x**2),
        pydso.FiniteHorizon(20),
        pydso.Normal(jnp.ones(1), 0.3),
    )
    a = jnp.asarray(1.0)
    p = pydso.pathwise_gradient(problem, a, key=jax.random.key(0), n=400)
    s = pydso.score_gradient(problem, a, key=jax.random.key(1), n=400)
    diff, se = float(p.gradient - s.gradient), float(np.hypot(p.stderr, s.stderr))
    assert abs(diff) < 4 * se, (float(p.gradient), float(s.gradient), se)


def test_estimators_are_traceable_under_jit_and_equal_the_eager_estimate():
    """Users (and the demo) jit around the estimators; the eager finiteness check must not break tracing."""
    A = jnp.array([[1.0, 0.1], [0.0, 1.0]])
    B = jnp.array([[0.0], [0.1]])
    problem = pydso.Problem(
        system=pydso.GaussianChain(lambda x, K: A @ x - B @ (K @ x), 0.05),
        cost=lambda x, K: x @ x,
        setting=pydso.Episodic(gamma=0.9, horizon=20),
        initial=pydso.Normal(jnp.zeros(2), 1.0),
    )
    theta = jnp.zeros((1, 2))
    key = jax.random.key(3)
    for estimate in (pydso.pathwise_gradient, pydso.score_gradient):
        jitted = jax.jit(lambda t, k, estimate=estimate: estimate(problem, t, key=k, n=8).gradient)(theta, key)
        assert_tree_allclose(jitted, estimate(problem, theta, key=key, n=8).gradient, rtol=1e-9, atol=1e-12)


def _lorenz_with_terminal_cost(adjoint=None):
    import diffrax

    def field(t, x, th):
        return jnp.array([th[0] * (x[1] - x[0]), x[0] * (th[1] - x[2]) - x[1], x[0] * x[1] - th[2] * x[2]])

    system = pydso.ODESystem(
        field, dt=0.01, solver=diffrax.Tsit5(), adjoint=adjoint or diffrax.RecursiveCheckpointAdjoint()
    )
    return pydso.Problem(
        system,
        lambda x, th: x @ x,
        pydso.FiniteHorizon(40),
        pydso.Normal(jnp.ones(3), 1.0),
        terminal_cost=lambda x, th: x[2] + 0.1 * th[0] * x[0],
    )


@pytest.mark.parametrize("kind", ["lqr_chain", "ode_fastpath", "ode_diffrax_forward_adjoint", "sde"])
def test_forward_mode_pathwise_equals_reverse_mode_per_episode(kind):
    # Forward mode gives every episode's gradient: its mean and per-episode standard error must equal reverse mode
    # with one group per episode, to rounding.
    import diffrax

    backend, reference = None, None
    if kind == "lqr_chain":
        problem, theta = LQR.problem(), K_TEST
    elif kind == "sde":
        problem, theta = _damped_sde(), jnp.asarray(1.5)
    else:
        theta = jnp.array([10.0, 28.0, 8.0 / 3.0])
        if kind == "ode_fastpath":
            problem = _lorenz_with_terminal_cost()
        else:
            problem = _lorenz_with_terminal_cost(diffrax.ForwardMode())
            reference = _lorenz_with_terminal_cost()  # the same solve with a reverse-mode adjoint
            backend = pydso.backends.JaxBackend(integrator="diffrax")
    n, key = 12, jax.random.key(3)
    rev = pydso.Pathwise(groups=n, backend=backend).estimate(reference or problem, theta, key=key, n=n)
    fwd = pydso.Pathwise(mode="forward", backend=backend).estimate(problem, theta, key=key, n=n)
    assert_tree_allclose(fwd.gradient, rev.gradient, rtol=1e-10)
    assert_tree_allclose(fwd.stderr, rev.stderr, rtol=1e-8)
    np.testing.assert_allclose(float(fwd.objective), float(rev.objective), rtol=1e-12)
    np.testing.assert_allclose(float(fwd.objective_stderr), float(rev.objective_stderr), rtol=1e-10)


def test_forward_mode_pathwise_names_the_adjoint_that_cannot_do_it():
    backend = pydso.backends.JaxBackend(integrator="diffrax")
    with pytest.raises(pydso.ProblemError, match=r"adjoint=diffrax.ForwardMode\(\)"):
        pydso.Pathwise(mode="forward", backend=backend).estimate(
            _lorenz_with_terminal_cost(), jnp.array([10.0, 28.0, 8.0 / 3.0]), key=jax.random.key(0), n=2
        )
    with pytest.raises(pydso.ProblemError, match="Pathwise.mode must be"):
        pydso.Pathwise(mode="sideways")
