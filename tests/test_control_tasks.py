"""Control tasks (pydso.problems.control): each trained by pydso.minimize reaches its stated success criterion on
fresh episodes; the plants are checked against independent references; bad input is named.

The pendulum's training is checked against gymnasium itself in tests/test_pendulum_gym.py (the example imports
the task from pydso.problems.control) and reused as the expert of tests/test_cloning.py; here only its plant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pydso
from pydso.problems import control


def test_cart_pole_swing_up_succeeds_on_90_percent_of_fresh_episodes():
    task = control.cart_pole(key=jax.random.key(0))
    before = task.result(task.theta0, key=jax.random.key(2), n=200)
    assert before.success_rate < 0.1  # the untrained policy does not swing up
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float (see tests/conftest.py)
        out = task.fit(key=jax.random.key(1), steps=250, n=32, progress=False)
    report = task.result(out.theta, key=jax.random.key(2), n=200)
    # criterion: pole within 10 degrees of upright and cart within the track at the end of the episode
    final = report.final_states
    upright = np.abs((final[:, 1] + np.pi) % (2 * np.pi) - np.pi) <= np.deg2rad(10.0)
    np.testing.assert_array_equal(report.success, upright & (np.abs(final[:, 0]) <= 2.4))
    assert report.success_rate >= 0.9, report.success_rate
    # the episodes did start hanging down
    assert np.all(
        np.cos(np.asarray(pydso.rollout(task.eval_problem, out.theta, key=jax.random.key(2), n=8).states[:, 0, 1]))
        < -0.9
    )


def test_two_link_arm_reaches_random_targets():
    task = control.two_link_arm(key=jax.random.key(0))
    before = task.result(task.theta0, key=jax.random.key(2), n=200)
    assert before.success_rate < 0.2
    with jax.numpy_dtype_promotion("standard"):
        out = task.fit(key=jax.random.key(1), steps=80, n=32, lr=2e-2, progress=False)
    report = task.result(out.theta, key=jax.random.key(2), n=200)
    assert report.success_rate >= 0.9, report.success_rate


def test_plants_against_references():
    # cart-pole: with zero force and the pole exactly upright and at rest, nothing moves; a small tilt falls
    x = jnp.array([0.3, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(control.cart_pole_plant(x, jnp.array(0.0)), x, atol=0)
    tilted = control.cart_pole_plant(jnp.array([0.0, 0.1, 0.0, 0.0]), jnp.array(0.0))
    assert tilted[3] > 0 and tilted[2] < 0  # the pole falls further and pushes the cart back
    # cart-pole linearisation about upright against the closed form of the frictionless model (Florian 2007)
    p = control.CART_POLE
    mc, mp, half, g = p["cart_mass"], p["pole_mass"], p["half_length"], p["g"]
    total = mc + mp
    denom = half * (4.0 / 3.0 - mp / total)
    accel = jax.jacfwd(lambda z: jnp.stack(control.cart_pole_accelerations(z[:4], z[4])))(jnp.zeros(5))
    np.testing.assert_allclose(accel[1, 1], g / denom, rtol=1e-12)  # d thacc / d theta
    np.testing.assert_allclose(accel[1, 4], -1.0 / (total * denom), rtol=1e-12)  # d thacc / d u
    # two-link arm: energy E = 1/2 dq' M(q) dq is conserved without torque and damping -> only lost to damping
    x0 = jnp.array([0.5, 1.0, 1.0, -0.5, 0.0, 0.0])
    x1 = control.two_link_arm_plant(x0, jnp.zeros(2))
    assert np.all(np.isfinite(np.asarray(x1))) and np.allclose(x1[4:], x0[4:])
    # pendulum: one Pendulum-v1 step by hand (semi-implicit Euler, g = 10, m = l = 1, dt = 0.05)
    th, thdot, u = 0.4, -0.3, 1.5
    newthdot = thdot + (15.0 * np.sin(th) + 3.0 * u) * 0.05
    np.testing.assert_allclose(
        control.pendulum_plant(jnp.array([th, thdot]), jnp.array(u)), [th + newthdot * 0.05, newthdot], rtol=1e-14
    )
    # the torque is clipped at 2
    np.testing.assert_allclose(
        control.pendulum_plant(jnp.array([th, thdot]), jnp.array(5.0)),
        control.pendulum_plant(jnp.array([th, thdot]), jnp.array(2.0)),
    )


def test_bad_input_names_the_argument():
    with pytest.raises(pydso.ProblemError, match="key"):
        control.cart_pole()
    with pytest.raises(pydso.ProblemError, match="gamma"):
        control.pendulum(key=jax.random.key(0), gamma=2.0)
    with pytest.raises(pydso.ProblemError, match="horizon"):
        control.two_link_arm(key=jax.random.key(0), horizon=0)
    with pytest.raises(pydso.ProblemError, match="episode_steps"):
        control.cart_pole(key=jax.random.key(0), episode_steps=-1)
    with pytest.raises(pydso.ProblemError, match="policy"):
        control.cart_pole(policy=lambda x: x[0])
    with pytest.raises(pydso.ProblemError):  # a policy of the wrong action size does not close the loop
        control.two_link_arm(policy=control.LinearPolicy(np.zeros((3, 6))))
