"""minimize: convergence to the Riccati optimum, exact resume from checkpoints, divergence guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from closed_form import double_integrator

import pydso

LQR = double_integrator(sigma=0.05, horizon=120)


def test_minimize_reaches_riccati_gain_within_one_percent():
    # Noise-free plant, random x0: the optimal gain does not depend on x0, so every episode's gradient
    # vanishes at K* and stochastic gradient descent converges to it rather than hovering around it.
    lqr = double_integrator(sigma=0.0, horizon=120)
    k_star = lqr.optimal_gain()
    schedule = optax.cosine_decay_schedule(0.1, decay_steps=1500, alpha=0.01)
    result = pydso.minimize(
        lqr.problem(), jnp.zeros((1, 2)), key=jax.random.key(1), steps=1500, n=32, optimizer=optax.adam(schedule)
    )
    rel = np.abs(np.asarray(result.theta) - k_star) / np.abs(k_star)
    assert np.all(rel < 0.01), f"K={np.asarray(result.theta)}, K*={k_star}, rel. error {rel}"
    # The closed-form objective confirms we are at the optimum, not at a lucky gain.
    assert float(lqr.objective(result.theta)) <= float(lqr.objective(jnp.asarray(k_star))) * (1 + 1e-4)
    assert len(result.history["objective"]) == 1500


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    problem = LQR.problem()
    kwargs = dict(key=jax.random.key(3), steps=12, n=32, optimizer=optax.adam(0.05), checkpoint_every=5)
    full = pydso.minimize(problem, jnp.zeros((1, 2)), **kwargs)

    class Interrupt(Exception):
        pass

    def interrupt_at_step_8(info):
        if info.step == 8:
            raise Interrupt

    path = tmp_path / "run.npz"
    with pytest.raises(Interrupt):
        pydso.minimize(problem, jnp.zeros((1, 2)), checkpoint=path, callback=interrupt_at_step_8, **kwargs)
    assert path.exists()
    resumed = pydso.minimize(problem, jnp.zeros((1, 2)), checkpoint=path, **kwargs)
    np.testing.assert_array_equal(np.asarray(resumed.theta), np.asarray(full.theta))
    np.testing.assert_array_equal(resumed.history["objective"], full.history["objective"])


def test_keyboard_interrupt_saves_the_committed_step_and_resume_is_bit_identical(tmp_path):
    problem = LQR.problem()
    kwargs = dict(key=jax.random.key(4), steps=10, n=16, optimizer=optax.adam(0.05), checkpoint_every=100)
    full = pydso.minimize(problem, jnp.zeros((1, 2)), **kwargs)

    def ctrl_c_at_step_6(info):
        if info.step == 6:
            raise KeyboardInterrupt

    path = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        pydso.minimize(problem, jnp.zeros((1, 2)), checkpoint=path, callback=ctrl_c_at_step_6, **kwargs)
    resumed = pydso.minimize(problem, jnp.zeros((1, 2)), checkpoint=path, **kwargs)
    np.testing.assert_array_equal(np.asarray(resumed.theta), np.asarray(full.theta))
    np.testing.assert_array_equal(resumed.history["objective"], full.history["objective"])


def test_resume_refuses_a_checkpoint_of_another_structure(tmp_path):
    path = tmp_path / "run.npz"
    pydso.minimize(LQR.problem(), jnp.zeros((1, 2)), key=jax.random.key(0), steps=2, n=8, checkpoint=path)
    with pytest.raises(pydso.ProblemError, match="does not match this run"):
        pydso.minimize(
            LQR.problem(),
            jnp.zeros((1, 2)),
            key=jax.random.key(0),
            steps=4,
            n=8,
            checkpoint=path,
            optimizer=optax.sgd(0.1, momentum=0.9),
        )
    with pytest.raises(pydso.ProblemError, match="n: checkpoint 8, this run 16"):
        pydso.minimize(LQR.problem(), jnp.zeros((1, 2)), key=jax.random.key(0), steps=4, n=16, checkpoint=path)
    with pytest.raises(
        pydso.ProblemError, match="estimator: checkpoint 'Pathwise', this run 'Score\\(MeanBaseline\\)'"
    ):
        pydso.minimize(
            LQR.problem(), jnp.zeros((1, 2)), key=jax.random.key(0), steps=4, n=8, checkpoint=path, estimator="score"
        )
    with pytest.raises(pydso.ProblemError, match="different key"):
        pydso.minimize(LQR.problem(), jnp.zeros((1, 2)), key=jax.random.key(1), steps=4, n=8, checkpoint=path)


def test_divergence_guard_stops_and_keeps_best_theta():
    with pytest.raises(pydso.DivergenceError, match="diverged at step") as info:
        pydso.minimize(
            LQR.problem(), jnp.zeros((1, 2)), key=jax.random.key(0), steps=200, n=16, optimizer=optax.sgd(50.0)
        )
    best = info.value.best_theta
    assert np.all(np.isfinite(np.asarray(best)))
    assert len(info.value.history["objective"]) >= 1


def test_callback_can_stop_early():
    seen = []
    result = pydso.minimize(
        LQR.problem(),
        jnp.zeros((1, 2)),
        key=jax.random.key(0),
        steps=50,
        n=8,
        callback=lambda info: seen.append(info.objective) or info.step == 4,
    )
    assert result.steps == 5 and len(seen) == 5 and "callback" in result.message


def test_score_estimator_also_descends():
    result = pydso.minimize(
        LQR.problem(),
        jnp.zeros((1, 2)),
        key=jax.random.key(2),
        steps=60,
        n=256,
        optimizer=optax.adam(0.1),
        estimator=pydso.Score(pydso.StateValueBaseline()),
    )
    assert float(LQR.objective(result.theta)) < 0.8 * float(LQR.objective(jnp.zeros((1, 2))))
