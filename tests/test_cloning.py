"""Behavioural cloning (pydso.problems.cloning): the learned LQR gain against the exact expert gain (DARE), the
pendulum against the expert's own return (open-loop regression drifts, the DSO learner does not), and bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import pydso
from pydso.problems import control
from pydso.problems.cloning import cloning, regression

A = np.array([[1.0, 0.1], [0.0, 1.0]])
B = np.array([[0.005], [0.1]])


def lqr_gain(q=1.0, r=0.1):
    P = scipy.linalg.solve_discrete_are(A, B, q * np.eye(2), np.array([[r]]))
    return np.linalg.solve(r + B.T @ P @ B, B.T @ P @ A)


def plant(x, u):
    return jnp.asarray(A) @ x + jnp.asarray(B) @ u


def adam(steps, lr=1e-2):
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def test_lqr_expert_gain_recovered_on_the_noisy_closed_loop():
    """Expert u = -K x (K from the discrete Riccati equation), learner u = -K_hat x starting at 0, noisy plant:
    Gauss-Newton on the imitation residuals over fixed keys (states re-simulated under the learner) reaches K."""
    K = lqr_gain()
    expert_gain = jnp.asarray(K)
    p = cloning(
        expert=lambda x: -expert_gain @ x,
        policy=control.LinearPolicy(np.zeros((1, 2))),
        plant=plant,
        initial=pydso.Normal(np.zeros(2), np.ones(2)),
        horizon=30,
        noise=0.05,
    )
    ls = p.least_squares(key=jax.random.key(0), n=16)
    out = pydso.minimize(ls, p.theta0, key=jax.random.key(1), method=pydso.GaussNewton(), steps=20)
    gain = np.asarray(out.theta.gain)
    rel = np.abs(gain - K).max() / np.abs(K).max()
    assert rel < 1e-3, (gain, K, rel)
    assert out.steps < 20, out.message  # converged by its own test, not by the step cap
    # the loss on fresh episodes (other keys) vanishes too; at the start it does not
    assert p.result(out.theta, n=64).imitation_loss < 1e-12
    assert p.result(p.theta0, n=64).imitation_loss > 1.0


def test_lqr_expert_from_demonstrations_only(tmp_path):
    """Expert given as a dataset (states and actions of 6 demonstrations): tracking loss on the learner's closed
    loop from the demonstrations' starts; deterministic plant, so the expert gain is again the exact minimiser."""
    K = lqr_gain()
    rng = np.random.default_rng(0)
    xs = np.zeros((6, 21, 2))
    xs[:, 0] = rng.normal(size=(6, 2))
    us = np.full((6, 21, 1), np.nan)
    for t in range(20):
        us[:, t] = -xs[:, t] @ K.T
        xs[:, t + 1] = xs[:, t] @ A.T + us[:, t] @ B.T
    data = pydso.data.make_dataset(xs, input=us)
    p = cloning(expert=data, policy=control.LinearPolicy(np.zeros((1, 2))), plant=plant, horizon=20)
    assert p.mode == "data"
    out = p.fit(key=jax.random.key(0), n=12)  # Gauss-Newton as one compiled loop
    assert out.message == "successful", out.message
    gain = np.asarray(out.theta.gain)
    assert np.abs(gain - K).max() / np.abs(K).max() < 1e-6, (gain, K)
    # the same demonstrations from a pydso store on disk give the same problem
    store = pydso.data.save(data, tmp_path / "demos")
    q = cloning(expert=store, policy=control.LinearPolicy(np.zeros((1, 2))), plant=plant, horizon=20)
    z = jnp.array([0.3, -0.2, 4.0, 5.0])  # state (0.3, -0.2) at step 4 of demonstration 5
    np.testing.assert_array_equal(q.residual_fn(z, out.theta), p.residual_fn(z, out.theta))
    expected = np.concatenate([(-(K @ [0.3, -0.2])) - us[5, 4], [0.3, -0.2] - xs[5, 4]])
    np.testing.assert_allclose(p.residual_fn(z, out.theta), expected, rtol=1e-9)


@pytest.fixture(scope="module")
def pendulum_expert():
    """A swing-up expert trained by pydso on the pendulum task (short training: a good, not optimal, expert)."""
    task = control.pendulum(key=jax.random.key(0))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float (see tests/conftest.py)
        out = task.fit(key=jax.random.key(10_000), steps=100, n=32, progress=False)
    return task, out.theta


def test_pendulum_regression_drifts_dso_learner_reaches_expert_return(pendulum_expert):
    task, theta = pendulum_expert
    expert = task.policy(theta)
    expert_return = task.result(theta, key=jax.random.key(5), n=200).mean_return
    assert expert_return > -300.0  # a real swing-up expert (random policies score about -1200)

    # four demonstrations of the task, recorded as a pydso dataset
    traj = pydso.rollout(task.eval_problem, theta, key=jax.random.key(3), n=4)
    actions = np.array(jax.vmap(jax.vmap(expert))(traj.states))[..., None]
    actions[:, -1] = np.nan  # the last recorded state has no action
    data = pydso.data.make_dataset(np.asarray(traj.states), input=actions)

    def learner():
        return eqx.filter_jit(
            lambda k: control.MLPPolicy(
                3, "scalar", key=k, width=64, depth=2, limit=2.0, observe=control.pendulum_observe
            )
        )(jax.random.key(7))

    evaluation = control.pendulum(policy=learner())

    with jax.numpy_dtype_promotion("standard"):
        # open-loop regression on the demonstrations: fits them, then drifts off them
        reg = regression(data, learner())
        fit = pydso.minimize(
            reg.problem, reg.theta0, key=jax.random.key(0), method=pydso.Gradient(adam(300), n=256), steps=300
        )
        # DSO: the closed loop under the learner, expert queried on the visited states
        p = cloning(
            expert=expert,
            policy=learner(),
            plant=control.pendulum_plant,
            initial=pydso.Uniform([-np.pi, -3.0], [np.pi, 3.0]),
            horizon=20,
            gamma=0.9,
        )
        dso = pydso.minimize(
            p.problem, p.theta0, key=jax.random.key(1), method=pydso.Gradient(adam(150), n=32), steps=150
        )
    assert reg.result(fit.theta, n=512).rms_action_error < 0.1  # regression fits the data it was given
    regression_return = evaluation.result(fit.theta, key=jax.random.key(5), n=200).mean_return
    dso_return = evaluation.result(dso.theta, key=jax.random.key(5), n=200).mean_return
    assert abs(dso_return - expert_return) <= 0.05 * abs(expert_return), (dso_return, expert_return)
    assert regression_return < expert_return - 0.05 * abs(expert_return), (regression_return, expert_return)


def test_bad_input_names_the_argument():
    K = jnp.asarray(lqr_gain())
    ok = dict(
        expert=lambda x: -K @ x,
        policy=control.LinearPolicy(np.zeros((1, 2))),
        plant=plant,
        initial=pydso.Normal(np.zeros(2), np.ones(2)),
        horizon=10,
    )
    cases = [
        (dict(initial=None), "initial"),
        (dict(horizon=None), "horizon"),
        (dict(plant=3), "plant"),
        (dict(policy=control.LinearPolicy(np.zeros((2, 2)))), "expert returns 1"),
        (dict(noise=-1.0), "noise"),
        (dict(gamma=1.5), "gamma"),
        (dict(action_scale=0.0), "action_scale"),
        (dict(policy="not a policy"), "policy"),
        (dict(plant=lambda x, u: x[:1]), "plant"),
    ]
    for change, word in cases:
        with pytest.raises(pydso.ProblemError, match=word):
            cloning(**{**ok, **change})
    xs = np.zeros((2, 5, 2))
    us = np.zeros((2, 5, 3))
    data = pydso.data.make_dataset(xs, input=us)
    with pytest.raises(pydso.ProblemError, match="input_dim"):
        cloning(expert=data, policy=control.LinearPolicy(np.zeros((1, 2))), plant=plant)
    good = pydso.data.make_dataset(xs, input=np.zeros((2, 5, 1)))
    with pytest.raises(pydso.ProblemError, match="horizon"):
        cloning(expert=good, policy=control.LinearPolicy(np.zeros((1, 2))), plant=plant, horizon=9)
    with pytest.raises(pydso.ProblemError, match="noise"):
        cloning(expert=good, policy=control.LinearPolicy(np.zeros((1, 2))), plant=plant, noise=0.1)
    with pytest.raises(pydso.DatasetError, match="input"):
        cloning(expert=pydso.data.make_dataset(xs), policy=control.LinearPolicy(np.zeros((1, 2))), plant=plant)
