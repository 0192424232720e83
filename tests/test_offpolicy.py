"""Off-policy estimators (pydso.estimators: weights, score gradient, value fits) against pydso.exact."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_tabular_problem

import pydso
from pydso import estimators as op
from pydso import exact

S, GAMMA, H = 4, 0.7, 50  # truncation bias gamma^H ~ 2e-8


@functools.lru_cache
def tabular(seed):
    problem, theta = random_tabular_problem(seed, S, gamma=GAMMA)
    problem = pydso.Problem(problem.system, problem.cost, pydso.Episodic(GAMMA, H), problem.initial, name="tab")
    behaviour = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(100 + seed), a.shape), theta)
    return problem, theta, behaviour


def z_scores(est, exact_tree):
    z = jax.tree.map(
        lambda g, se, e: np.abs(np.asarray(g) - np.asarray(e)) / np.asarray(se), est.gradient, est.stderr, exact_tree
    )
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(z)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_is_gradient_from_behaviour_data_matches_exact_gradient(seed):
    problem, theta, behaviour = tabular(seed)
    traj = pydso.rollout(problem, behaviour, key=jax.random.key(seed), n=3000)
    est = op.offpolicy_gradient(problem, theta, traj)
    assert np.all(z_scores(est, exact.gradient(problem, theta)) < 4.0)
    # the objective estimate too
    assert abs(float(est.objective) - float(exact.objective(problem, theta))) < 4 * float(est.objective_stderr)
    # the test can fail: the behaviour's own gradient is many standard errors away
    assert np.max(z_scores(est, exact.gradient(problem, behaviour))) > 4.0


def test_weight_variants_and_baselines():
    problem, theta, behaviour = tabular(0)
    traj = pydso.rollout(problem, behaviour, key=jax.random.key(3), n=3000)
    plain = op.offpolicy_gradient(problem, theta, traj, baseline=pydso.NoBaseline())
    huge_clip = op.offpolicy_gradient(problem, theta, traj, baseline=pydso.NoBaseline(), weight_clip=1e12)
    assert np.allclose(jax.tree.leaves(plain.gradient)[0], jax.tree.leaves(huge_clip.gradient)[0], rtol=1e-12)
    exact_g = exact.gradient(problem, theta)
    for kwargs in (
        {"normalize": True},
        {"baseline": pydso.MeanBaseline()},
        {"baseline": pydso.StateValueBaseline(value_fn=lambda x, th: exact.value(problem, theta)[x])},
        {"baseline": pydso.StateValueBaseline(features=lambda x, t: jax.nn.one_hot(x, S))},
    ):
        est = op.offpolicy_gradient(problem, theta, traj, **kwargs)
        assert np.all(z_scores(est, exact_g) < 4.5), kwargs
    mean = op.offpolicy_gradient(problem, theta, traj, baseline=pydso.MeanBaseline())
    se = lambda e: float(sum(jnp.sum(v**2) for v in jax.tree.leaves(e.stderr)))  # noqa: E731
    assert se(mean) < se(plain)
    # weights: W_0 = 1; on-policy weights are exactly 1
    batch = op.as_batch(traj, problem)
    W = op.importance_weights(op.log_ratios(problem, behaviour, batch))
    assert np.allclose(W, 1.0)
    W = op.importance_weights(op.log_ratios(problem, theta, batch), weight_clip=2.0)
    assert np.all(W <= 2.0 + 1e-12) and np.allclose(W[:, 0], 1.0)


def test_ess_drops_as_theta_moves_away_from_behaviour():
    problem, _, behaviour = tabular(1)
    traj = pydso.rollout(problem, behaviour, key=jax.random.key(4), n=3000)
    direction = jax.tree.map(lambda a: jax.random.normal(jax.random.key(9), a.shape), behaviour)
    ess = []
    for alpha in (0.0, 0.1, 0.3, 0.6, 1.0):
        th = jax.tree.map(lambda b, d, a=alpha: b + a * d, behaviour, direction)
        ess.append(op.ess_report(problem, th, traj, warn_below=None)["episode"])
    assert ess[0] == pytest.approx(3000.0)
    assert all(a > b for a, b in zip(ess, ess[1:], strict=False)), ess
    far = jax.tree.map(lambda b, d: b + 3.0 * d, behaviour, direction)
    with pytest.warns(UserWarning, match="effective sample size"):
        op.ess_report(problem, far, traj, warn_below=0.5)
    w = op.importance_weights(op.log_ratios(problem, far, op.as_batch(traj, problem)))
    per_decision = op.effective_sample_size(w)
    assert per_decision.shape == (H + 1,) and float(per_decision[0]) == pytest.approx(3000.0)
    assert float(per_decision[-1]) < float(per_decision[1])
    with pytest.warns(UserWarning):
        op.effective_sample_size(w[:, -1], warn_below=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.effective_sample_size(jnp.ones(10), warn_below=0.5)


def test_streaming_dataset_matches_in_memory(tmp_path):
    from pydso import data as pdata

    problem, theta, behaviour = tabular(2)
    traj = pydso.rollout(problem, behaviour, key=jax.random.key(5), n=600)
    ds = pdata.to_dataset(traj, problem, behaviour)
    pdata.save(ds, tmp_path / "log.zarr")
    stored = pdata.open(tmp_path / "log.zarr")
    mem = op.offpolicy_gradient(problem, theta, traj, baseline=pydso.NoBaseline())
    streamed = op.offpolicy_gradient(problem, theta, stored, baseline=pydso.NoBaseline(), episodes_per_chunk=200)
    for a, b in zip(jax.tree.leaves(mem), jax.tree.leaves(streamed), strict=True):
        assert np.allclose(a, b, rtol=1e-10, atol=1e-12)
    feats = lambda x: jax.nn.one_hot(x, S)  # noqa: E731
    v_mem = op.fit_value_linear(problem, theta, traj, feats)
    v_str = op.fit_value_linear(problem, theta, stored, feats, episodes_per_chunk=200)
    assert np.allclose(v_mem.coef, v_str.coef, rtol=1e-9)
    none = pydso.NoBaseline()
    norm_mem = op.offpolicy_gradient(problem, theta, traj, normalize=True, baseline=none)
    norm_str = op.offpolicy_gradient(problem, theta, stored, normalize=True, baseline=none, episodes_per_chunk=200)
    assert np.allclose(jax.tree.leaves(norm_mem.gradient)[0], jax.tree.leaves(norm_str.gradient)[0], rtol=1e-9)
    with pytest.raises(pydso.ProblemError, match="behavior_logp"):
        op.offpolicy_gradient(problem, theta, ds.drop_vars("behavior_logp"))


@pytest.mark.parametrize(
    "method, lam, weighting", [("td", 0.0, "behavior"), ("td", 0.6, "target"), ("mc", 0.0, "target")]
)
def test_importance_weighted_value_fits_match_exact_values(method, lam, weighting):
    problem, theta, behaviour = tabular(0)
    traj = pydso.rollout(problem, behaviour, key=jax.random.key(6), n=3000)
    V = op.fit_value_linear(
        problem, theta, traj, lambda x: jax.nn.one_hot(x, S), method=method, lam=lam, state_weighting=weighting
    )
    exact_v = np.asarray(exact.value(problem, theta))
    fitted = np.asarray(jax.vmap(V)(jnp.arange(S)))
    assert np.max(np.abs(fitted - exact_v)) < 0.03 * np.ptp(exact_v) + 0.02
    # and far from the behaviour's values (the reweighting matters)
    assert np.max(np.abs(np.asarray(exact.value(problem, behaviour)) - exact_v)) > 0.1


def test_value_network_fit():
    import equinox as eqx

    problem, theta, behaviour = tabular(1)
    traj = pydso.rollout(problem, behaviour, key=jax.random.key(7), n=3000)

    class Net(eqx.Module):
        mlp: eqx.nn.MLP

        def __call__(self, x):
            return self.mlp(jax.nn.one_hot(x, S))

    net = Net(eqx.nn.MLP(S, "scalar", 16, 1, key=jax.random.key(0)))
    import optax

    exact_v = np.asarray(exact.value(problem, theta))
    for method in ("mc", "td"):
        fit = op.fit_value_network(
            net,
            problem,
            theta,
            traj,
            key=jax.random.key(1),
            method=method,
            epochs=6,
            minibatch=30,
            optimizer=optax.adam(1e-2),
        )
        fitted = np.asarray(jax.vmap(fit)(jnp.arange(S)))
        assert np.max(np.abs(fitted - exact_v)) < 0.1 * np.ptp(exact_v) + 0.1, (method, fitted, exact_v)


def test_offpolicy_objective_on_sde_logs_equals_the_rollout_objective():
    # At the behaviour parameters every weight is 1: the IS objective must be the rollout's own objective,
    # which for an SDE integrates the running cost as L dt per step.
    problem = pydso.Problem(
        pydso.SDESystem(lambda t, x, a: -a * x, lambda t, x, a: 0.4, dt=0.1),
        lambda x, a: jnp.sum(x**2),
        pydso.FiniteHorizon(15),
        pydso.Normal(jnp.ones(1), 0.3),
    )
    traj = pydso.rollout(problem, jnp.asarray(1.0), key=jax.random.key(3), n=64)
    j, _ = pydso.estimators.offpolicy_objective(problem, jnp.asarray(1.0), traj)
    np.testing.assert_allclose(j, float(jnp.mean(traj.objective)), rtol=1e-10)


@pytest.mark.parametrize(
    "baseline",
    [pydso.NoBaseline(), pydso.MeanBaseline(), pydso.StateValueBaseline(features=lambda x, t: jax.nn.one_hot(x, S))],
    ids=["none", "mean", "value"],
)
def test_on_policy_score_is_the_offpolicy_gradient_with_unit_weights(baseline):
    # One implementation: Score on n fresh episodes == offpolicy_gradient on the same episodes logged at theta.
    problem, theta, _ = tabular(0)
    key = jax.random.key(11)
    on = pydso.score_gradient(problem, theta, key=key, n=400, baseline=baseline)
    traj = pydso.rollout(problem, theta, key=key, n=400)
    off = op.offpolicy_gradient(problem, theta, traj, baseline=baseline)
    for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    # on-policy data have log-ratios of (numerically) zero
    W = op.importance_weights(op.log_ratios(problem, theta, op.as_batch(traj, problem)))
    np.testing.assert_allclose(np.asarray(W), 1.0, rtol=1e-12)


def test_baselines_must_be_objects():
    problem, theta, _ = tabular(0)
    traj = pydso.rollout(problem, theta, key=jax.random.key(0), n=8)
    for bad in ("mean", None, lambda x, th: 0.0):
        with pytest.raises(pydso.ProblemError, match="baseline must be a baseline object"):
            op.offpolicy_gradient(problem, theta, traj, baseline=bad)
    with pytest.raises(pydso.ProblemError, match="MeanBaseline needs at least 2 episodes"):
        pydso.score_gradient(problem, theta, key=jax.random.key(0), n=1)
