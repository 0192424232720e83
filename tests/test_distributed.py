"""Distributed estimates over a Dask LocalCluster equal the single-process estimates for the same key.

One small cluster (2 single-threaded worker processes) serves every test of this module. The problem is a tiny
linear-Gaussian closed loop (2 states, horizon 12) whose callables live in this module, sent to the workers by
value (``cloudpickle.register_pickle_by_value``): the workers cannot import the test module.
"""

import sys

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose

import pydso
from pydso.estimators import distributed_estimate, distributed_objective

cloudpickle.register_pickle_by_value(sys.modules[__name__])

A = jnp.array([[1.0, 0.1], [-0.2, 0.95]])
B = jnp.array([[0.0], [0.1]])


def _mean(x, K):
    return A @ x - B @ (K @ x)


def _cost(x, K):
    u = K @ x
    return x @ x + 0.1 * (u @ u)


def _problem():
    return pydso.Problem(
        pydso.GaussianChain(_mean, 0.2),
        _cost,
        pydso.Episodic(0.95, 12),
        pydso.Normal(jnp.zeros(2), 1.0),
        name="tiny-lq",
    )


THETA = jnp.array([[0.3, 0.5]])
RTOL = 1e-12


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _close(a: pydso.Estimate, b: pydso.Estimate):
    assert_tree_allclose(a.gradient, b.gradient, rtol=RTOL, atol=1e-14)
    assert_tree_allclose(a.stderr, b.stderr, rtol=RTOL, atol=1e-14)
    assert_tree_allclose(a.objective, b.objective, rtol=RTOL, atol=1e-14)
    assert_tree_allclose(a.objective_stderr, b.objective_stderr, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize(
    "estimator, n, chunk_size",
    [
        (pydso.Score(), 48, None),  # MeanBaseline (leave-one-out over the batch) from global sums; default chunks
        (pydso.Score(pydso.StateValueBaseline()), 45, 9),  # fitted, cross-fitted on global folds: odd offsets
        (pydso.Score(pydso.NoBaseline()), 40, 20),  # one pass per chunk
        (pydso.Pathwise(groups=8), 48, 12),  # batch means: chunks of 2 groups of 6
    ],
)
def test_distributed_equals_single_process(client, estimator, n, chunk_size):
    problem, key = _problem(), jax.random.key(3)
    ref = estimator.estimate(problem, THETA, key=key, n=n)
    got = distributed_estimate(estimator, problem, THETA, key=key, n=n, client=client, chunk_size=chunk_size)
    _close(got, ref)
    # the comparison can fail: another key gives another estimate
    other = estimator.estimate(problem, THETA, key=jax.random.key(4), n=n)
    assert not np.allclose(np.asarray(other.gradient), np.asarray(got.gradient), rtol=1e-6)


def test_distributed_objective_equals_rollout(client):
    problem, key, n = _problem(), jax.random.key(5), 60
    values = np.asarray(pydso.rollout(problem, THETA, key=key, n=n).objective)
    J, se = distributed_objective(problem, THETA, key=key, n=n, client=client, chunk_size=15)
    np.testing.assert_allclose(J, values.mean(), rtol=RTOL)
    np.testing.assert_allclose(se, values.std(ddof=1) / np.sqrt(n), rtol=RTOL)


def test_bad_input(client):
    problem, key = _problem(), jax.random.key(0)
    with pytest.raises(pydso.ProblemError, match="client must be a dask.distributed.Client"):
        distributed_estimate(pydso.Score(), problem, THETA, key=key, n=8, client="tcp://localhost:8786")
    with pytest.raises(pydso.ProblemError, match=r"chunk_size=5 .* valid values: 1, 2, 4, 8"):
        distributed_estimate(pydso.Score(), problem, THETA, key=key, n=8, client=client, chunk_size=5)
    with pytest.raises(pydso.ProblemError, match="multiple of the group size 6"):
        distributed_estimate(pydso.Pathwise(groups=8), problem, THETA, key=key, n=48, client=client, chunk_size=9)
    with pytest.raises(pydso.ProblemError, match="chunk_size"):
        distributed_objective(problem, THETA, key=key, n=10, client=client, chunk_size=0)
    with pytest.raises(pydso.ProblemError, match="estimator must be pydso.Score"):
        distributed_estimate("score", problem, THETA, key=key, n=8, client=client)
    with pytest.raises(pydso.ProblemError, match="key"):
        distributed_objective(problem, THETA, key=None, n=8, client=client)
