"""The pendulum demo against gymnasium's own Pendulum-v1: same physics, same return, and the task is solved."""

import importlib.util
import pathlib

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "pendulum_swingup.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("pendulum_swingup_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained():
    ex = _load_example()
    model, result, info = ex.train(seed=0, progress=False)
    return ex, model, result


def _gym_episodes(ex, model, n_episodes, seed):
    import equinox as eqx
    import jax

    theta, static = eqx.partition(model, eqx.is_array)
    act = jax.jit(lambda theta, obs: eqx.combine(theta, static).act(obs))
    env = gym.make("Pendulum-v1")
    returns, starts = [], []
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        starts.append(np.array(env.unwrapped.state, dtype=np.float64))
        total, done = 0.0, False
        while not done:
            u = float(act(theta, obs))
            obs, reward, terminated, truncated, _ = env.step(np.array([u], dtype=np.float64))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return np.asarray(returns), np.asarray(starts)


def test_trained_policy_solves_gymnasium_pendulum(trained):
    ex, model, result = trained
    gym_returns, starts = _gym_episodes(ex, model, 100, seed=12345)
    assert gym_returns.mean() >= -200.0, f"gymnasium return {gym_returns.mean():.1f} +- {gym_returns.std():.1f}"
    # pydso's simulation of the same policy from the same initial states is gymnasium's episode, to rounding.
    pydso_returns = ex.returns_from(model, starts)
    np.testing.assert_allclose(pydso_returns, gym_returns, rtol=0, atol=1e-6)
    # pydso's own evaluation (fresh random starts from the task's distribution) agrees.
    assert ex.evaluate(model, 100, seed=7).mean() >= -200.0


class _ConstantTorque:
    """A "policy" applying a fixed torque (possibly beyond the limits, to exercise the clip)."""

    def __init__(self, u):
        self.u = u

    def __call__(self, x):
        import jax.numpy as jnp

        return jnp.asarray(self.u)


def test_physics_matches_gymnasium_with_random_torques():
    """Open-loop check of the step and cost, including both clips, with torques beyond the limits."""
    import jax
    import jax.numpy as jnp

    ex = _load_example()
    rng = np.random.default_rng(0)
    env = gym.make("Pendulum-v1").unwrapped
    for _ in range(20):
        env.reset(seed=int(rng.integers(1 << 30)))
        env.state = np.array([rng.uniform(-4, 4), rng.uniform(-9, 9)])
        u = rng.uniform(-3, 3)

        problem = ex.make_problem(_ConstantTorque(u))
        x = jnp.asarray(env.state)
        expected_cost = float(problem.cost(x, None))
        expected_next = np.asarray(jax.jit(problem.system.step_fn)(x, None))
        _, reward, *_ = env.step(np.array([u]))
        np.testing.assert_allclose(expected_next, env.state, rtol=0, atol=1e-12)
        np.testing.assert_allclose(expected_cost, -reward, rtol=0, atol=1e-12)
