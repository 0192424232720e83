"""State-estimator learning (pydso.problems.estimation): the learned constant gain of a linear-Gaussian plant is the
steady-state Kalman gain of scipy's Riccati solver; on a pendulum with a noisy angle sensor the learned observer is
compared with an extended Kalman filter on identical data; the EKF on a linear plant reaches the Riccati
covariance; bad input names the argument.

optax's Adam counts steps in int32 (see tests/conftest.py), so its runs are wrapped in standard dtype promotion; the
constructors, rollouts and filters run under the suite's strict promotion."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import pydso
from pydso.problems import AbstractConstructedProblem, ExtendedKalmanFilter, GainObserver, estimation

A = np.array([[0.95, 0.1], [-0.1, 0.9]])
C = np.array([[1.0, 0.0]])
Q = np.array([[0.02, 0.005], [0.005, 0.05]])  # correlated process noise
R = np.array([[0.1]])


def riccati_gain(A, C, Q, R):
    """Steady-state Kalman gain (filter form) from the stabilising solution of the filter DARE."""
    P = scipy.linalg.solve_discrete_are(A.T, C.T, Q, R)
    return np.linalg.solve(C @ P @ C.T + R, C @ P).T, P


def adam(lr, steps):
    return optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))


def minimize(problem, theta, *, key, method, steps):
    with jax.numpy_dtype_promotion("standard"):
        return pydso.minimize(problem, theta, key=key, method=method, steps=steps, progress=False)


def linear_problem(**kwargs):
    return estimation(A, C, process_noise=Q, measurement_noise=R, initial_mean=np.zeros(2), **kwargs)


def test_learned_gain_is_steady_state_kalman_gain():
    K_star, _ = riccati_gain(A, C, Q, R)
    p = linear_problem(horizon=80, burn_in=30)
    assert isinstance(p, AbstractConstructedProblem) and isinstance(p.problem, pydso.Problem)
    # (x, estimate) with a 1-D measurement: joint noise of rank 3 in dimension 4, hence a density-free chain
    assert isinstance(p.problem.system, pydso.ReparameterizedChain)
    np.testing.assert_allclose(p.kalman_gain(), K_star, rtol=1e-10)
    steps = 400
    out = minimize(
        p.problem, p.theta0, key=jax.random.key(1), method=pydso.Gradient(adam(0.05, steps), n=128), steps=steps
    )
    K = np.asarray(out.theta["gain"])
    rel = np.linalg.norm(K - K_star) / np.linalg.norm(K_star)
    assert rel < 0.01, (K.ravel(), K_star.ravel(), rel)
    # the exact steady-state error of the learned gain is (to second order) the Kalman optimum
    kalman_mse = p.steady_state_error(K_star)
    assert kalman_mse <= p.steady_state_error(K) <= kalman_mse * (1 + 1e-3)
    # and the Monte-Carlo report agrees with the exact error within its standard error
    r = p.result(out.theta, key=jax.random.key(2), n=256)
    assert r.kalman_mse == pytest.approx(kalman_mse)
    assert abs(r.mse - r.exact_mse) < 4 * r.mse_stderr, (r.mse, r.mse_stderr, r.exact_mse)


def test_exact_steady_state_error_matches_simulation_of_a_poor_gain():
    # The Lyapunov formula is an independent check of the chain: a detuned gain's simulated error matches it.
    p = linear_problem(horizon=120, burn_in=40)
    K = np.array([[0.8], [0.1]])
    r = p.result({"gain": jnp.asarray(K)}, key=jax.random.key(3), n=256)
    assert abs(r.mse - p.steady_state_error(K)) < 4 * r.mse_stderr
    assert p.steady_state_error(K) > 1.1 * r.kalman_mse


def test_ekf_on_a_linear_plant_reaches_the_riccati_covariance():
    K_star, P_prior = riccati_gain(A, C, Q, R)
    p = linear_problem(filter=ExtendedKalmanFilter(), initial_cov=np.eye(2), horizon=100, burn_in=10)
    traj = pydso.rollout(p.problem, {}, key=jax.random.key(0), n=1)
    assert traj.states.shape == (1, 101, 2 + 2 + 4)  # (x, x_hat, P)
    P_post = np.asarray(traj.states[0, -1, 4:]).reshape(2, 2)
    np.testing.assert_allclose(P_post, (np.eye(2) - K_star @ C) @ P_prior, rtol=1e-8, atol=1e-12)


def pendulum_kwargs(**extra):
    dt = 0.05

    def f(x):
        w = x[1] + dt * (-9.81 * jnp.sin(x[0]) - 0.1 * x[1])
        return jnp.stack([x[0] + dt * w, w])

    return dict(
        transition=f,
        measurement=lambda x: x[:1],
        process_noise=np.diag([1e-4, 4e-3]),
        measurement_noise=np.array([[0.1**2]]),
        initial_mean=np.array([2.0, 0.0]),  # large swings: the dynamics are far from linear
        initial_cov=np.diag([0.2**2, 0.2**2]),
        horizon=100,
        burn_in=20,
        **extra,
    )


def test_pendulum_learned_observer_vs_extended_kalman_filter():
    kw = pendulum_kwargs()
    learned = estimation(kw.pop("transition"), kw.pop("measurement"), **kw)
    kw = pendulum_kwargs()
    ekf = estimation(kw.pop("transition"), kw.pop("measurement"), filter=ExtendedKalmanFilter(), **kw)
    steps = 200
    out = minimize(
        learned.problem,
        {"gain": jnp.array([[0.5], [1.0]])},
        key=jax.random.key(1),
        method=pydso.Gradient(adam(0.05, steps), n=64),
        steps=steps,
    )
    key = jax.random.key(7)
    r_learned, r_ekf = learned.result(out.theta, key=key, n=256), ekf.result({}, key=key, n=256)
    # the same key gives the same true trajectories, whatever the filter
    _, x_learned = learned.errors(out.theta, key=key, n=256)
    _, x_ekf = ekf.errors({}, key=key, n=256)
    np.testing.assert_array_equal(np.asarray(x_learned), np.asarray(x_ekf))
    print(
        f"pendulum steady-state MSE: learned gain {r_learned.mse:.5f} ± {r_learned.mse_stderr:.5f}, "
        f"EKF {r_ekf.mse:.5f} ± {r_ekf.mse_stderr:.5f}"
    )
    assert np.isfinite(r_learned.mse) and np.isfinite(r_ekf.mse)
    # stated factor: a constant learned gain is within 10% of the EKF's error on the same data (measured: 2.5%)
    assert r_learned.mse <= 1.10 * r_ekf.mse
    # and far better than the open-loop predictor it started from (gain 0)
    r_open = learned.result({"gain": jnp.zeros((2, 1))}, key=key, n=256)
    assert r_learned.mse < 0.5 * r_open.mse


def test_density_free_chain_refuses_the_score_estimator():
    p = linear_problem(horizon=10, burn_in=0)
    with pytest.raises(pydso.ProblemError, match="log-density|density"):
        pydso.score_gradient(p.problem, p.theta0, key=jax.random.key(0), n=4)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(process_noise=np.array([[1.0, 0.0], [0.0, -0.1]])), "process_noise.*positive definite"),
        (dict(process_noise=np.array([[1.0, 0.5], [0.0, 1.0]])), "process_noise.*symmetric"),
        (dict(process_noise=np.eye(3)), "process_noise.*shape"),
        (dict(measurement_noise=np.zeros((1, 1))), "measurement_noise.*positive definite"),
        (dict(measurement_noise=np.eye(2)), "measurement_noise.*shape"),
        (dict(initial_mean=np.zeros((2, 1))), "initial_mean"),
        (dict(initial_mean=np.array([0.0, np.nan])), "initial_mean"),
        (dict(initial_cov=-np.eye(2)), "initial_cov"),
        (dict(transition=np.eye(3)), "transition"),
        (dict(transition=lambda x: x[:1]), "transition"),
        (dict(measurement="C"), "measurement"),
        (dict(filter="kalman"), "filter"),
        (dict(error_weights=np.array([1.0, -1.0])), "error_weights"),
        (dict(burn_in=50, horizon=50), "burn_in"),
        (dict(horizon=0), "horizon"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    kw = dict(transition=A, measurement=C, process_noise=Q, measurement_noise=R, initial_mean=np.zeros(2))
    kw.update(change)
    with pytest.raises(pydso.ProblemError, match=match):
        estimation(kw.pop("transition"), kw.pop("measurement"), **kw)


def test_bad_gain_shape_is_named():
    with pytest.raises(pydso.ProblemError, match="GainObserver.gain"):
        linear_problem(filter=GainObserver(gain=np.zeros((1, 2))))
    with pytest.raises(pydso.ProblemError, match="gain"):
        linear_problem().steady_state_error(np.zeros((2, 2)))
