"""The data path of benchmarks/bench_offline_pendulum.py (no torch / d3rlpy needed): the censored-Gaussian behaviour
density, and the state-action layout of a gymnasium Pendulum-v1 log checked against gymnasium itself."""

import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from pydso.estimators import as_batch, effective_sample_size, importance_weights, log_ratios

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_offline_pendulum", ROOT / "benchmarks" / "bench_offline_pendulum.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mean", [-2.5, -0.3, 0.0, 1.7])
def test_censored_logp_is_a_density(bench, mean):
    # mixed measure: Lebesgue on (-2, 2) plus point masses at -2 and 2; total mass 1, tails = normal cdf
    sigma = 0.5
    f = lambda a: float(jnp.exp(bench.censored_logp(jnp.asarray(a), jnp.asarray(mean), sigma)))
    inside, _ = integrate.quad(f, -2.0, 2.0, points=[mean] if -2 < mean < 2 else None)
    upper, lower = f(2.0), f(-2.0)
    np.testing.assert_allclose(upper, stats.norm.sf(2.0, mean, sigma), rtol=1e-10)
    np.testing.assert_allclose(lower, stats.norm.cdf(-2.0, mean, sigma), rtol=1e-10)
    np.testing.assert_allclose(inside + upper + lower, 1.0, rtol=1e-8)


def test_log_layout_against_gymnasium(bench, tmp_path):
    pytest.importorskip("gymnasium")
    model = bench.ps.init_policy(0)
    theta, static = eqx.partition(model, eqx.is_array)
    raw = bench.collect(model, 4, 0.5, seed=123)
    ds = bench.write_store(raw, str(tmp_path / "log.zarr"), "poor", 0.5).load()
    z = np.asarray(ds["state"].values)
    assert z.shape == (4, 202, 4)
    # the plant with gymnasium's parameters reproduces every logged transition (float32 observations)
    step = jax.vmap(jax.vmap(lambda x, u: bench.pendulum_step(x, u, 15.0, 3.0)))
    pred = np.asarray(step(jnp.asarray(z[:, 1:-1, :2]), jnp.asarray(z[:, 1:-1, 2])))
    np.testing.assert_allclose(pred, z[:, 2:, :2], atol=2e-5)
    # the chain's costs are gymnasium's rewards, and its density at the behaviour is the recorded one (ratios 1)
    problem = bench.chain_problem(static, 0.5, gamma=1.0, horizon=201)
    cost = jax.vmap(jax.vmap(lambda s: problem.cost(s, theta)))(jnp.asarray(z[:, 1:201]))
    np.testing.assert_allclose(np.asarray(cost), -raw["reward"], atol=1e-4)
    batch = as_batch(ds, problem)
    lr = np.asarray(log_ratios(problem, theta, batch))
    np.testing.assert_allclose(lr, 0.0, atol=1e-4)
    ess = float(effective_sample_size(importance_weights(jnp.asarray(lr))[:, -1]))
    assert ess == pytest.approx(4.0, rel=1e-6)
    # a different policy moves the weights (the check can fail)
    other = jax.tree.map(lambda a: a * 1.5, theta)
    assert np.abs(np.asarray(log_ratios(problem, other, batch))).max() > 1e-2
