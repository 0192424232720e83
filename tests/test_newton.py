"""NewtonCG (trust-region Newton on sampled Hessian-vector products) on LQR: the Riccati gain is the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from closed_form import double_integrator

import pydso

TOL = 1e-4


def _steps_to(lqr, method, steps):
    """Run minimize from K0 and return the number of steps until ||K - K*|| / ||K*|| < TOL (None if never)."""
    K_star = lqr.optimal_gain()
    errors = []

    def callback(info):
        errors.append(float(np.linalg.norm(np.asarray(info.theta) - K_star) / np.linalg.norm(K_star)))
        return errors[-1] < TOL

    with jax.numpy_dtype_promotion("standard"):  # optax's update rules mix int and float scalars
        pydso.minimize(
            lqr.problem(),
            jnp.array([[1.0, 1.0]]),
            key=jax.random.key(0),
            method=method,
            steps=steps,
            callback=callback,
            progress=False,
        )
    return (len(errors) if errors[-1] < TOL else None), errors


def test_newton_cg_reaches_the_riccati_gain_in_far_fewer_steps_than_gradient():
    # x0 ~ N(0, I), deterministic closed loop: every episode's objective is x0' P(K) x0, minimised by the Riccati
    # gain for any x0 (up to the truncation gamma^150 ~ 1e-7), so the sampled problem has the exact optimum.
    lqr = double_integrator(sigma=0.0, gamma=0.9, horizon=150)
    newton_steps, newton_errors = _steps_to(lqr, pydso.NewtonCG(n=32, radius=1.0), 15)
    assert newton_steps is not None and newton_steps <= 8, newton_errors
    # gradient descent with the best fixed step for the quadratic model at the optimum, 1 / lambda_max(H*)
    h_star = jax.hessian(lambda k: lqr.objective(k.reshape(1, 2)))(jnp.asarray(lqr.optimal_gain()).ravel())
    lr = 1.0 / float(np.linalg.eigvalsh(np.asarray(h_star)).max())
    gd_steps, gd_errors = _steps_to(lqr, pydso.Gradient(optax.sgd(lr), n=32), 3 * newton_steps)
    assert gd_steps is None, gd_errors[-1]  # not there after 3x as many steps
    print(
        f"NewtonCG: {newton_steps} steps to rel {TOL}; Gradient(sgd(1/lambda_max)): error {gd_errors[-1]:.2e} "
        f"after {len(gd_errors)} steps"
    )


def test_newton_cg_bad_arguments():
    with pytest.raises(pydso.ProblemError, match="radius"):
        pydso.NewtonCG(radius=-1.0)
    with pytest.raises(pydso.ProblemError, match="eta"):
        pydso.NewtonCG(eta=0.5)
    problem = pydso.Problem(
        pydso.TabularChain(lambda th: jax.nn.softmax(th, axis=1)),
        lambda x, th: jnp.asarray(1.0),
        pydso.Episodic(0.9, 10),
        pydso.Categorical(jnp.array([0.5, 0.5])),
    )
    with pytest.raises(pydso.ProblemError, match="pathwise"):
        pydso.minimize(problem, jnp.zeros((2, 2)), key=jax.random.key(0), method=pydso.NewtonCG(estimator="pathwise"))
