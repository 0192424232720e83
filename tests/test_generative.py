"""Generative-model tuning (pydso.problems.generative): KL-regularised tuning of a pretrained chain reaches the tilted
optimum p0(x) exp(r(x)/beta) / Z.

* 1-D linear-Gaussian chain with a linear reward: the optimal tuned chain shifts each step's mean by
  delta_t = sigma_t^2 (a / beta) prod_{s > t} alpha_s (derivation in ``exact_shifts``), and min J = -beta log Z.
* a DDPM pretrained on a 2-D mixture of four Gaussians: with a reward that tilts the components, the tuned model's
  component weights match the tilted weights (importance-weighted samples of the pretrained model) within 0.05; the
  reward rises and the path KL stays bounded across training.

optax's Adam counts steps in int32 (see tests/conftest.py), so optimisation runs (tuning and the DDPM pretraining)
are wrapped in standard dtype promotion; constructors and rollouts run under the suite's strict promotion."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pydso
from pydso.problems import (
    AbstractConstructedProblem,
    DenoisingChain,
    GaussianMixture,
    generative,
    pretrain_ddpm,
    tilted_weights,
)

H = 8
ALPHA = np.linspace(0.6, 0.95, H)
BIAS = np.linspace(-0.2, 0.3, H)
SIGMA = np.linspace(0.8, 0.2, H)
M0, S0 = 0.5, 1.0  # x_0 ~ N(M0, S0^2)


def linear_chain():
    A, B = jnp.asarray(ALPHA), jnp.asarray(BIAS)

    def mean(t, x, params):
        k = jnp.round(t).astype(jnp.int32)
        return A[k] * x + B[k] + params["shift"][k]

    return DenoisingChain(mean, SIGMA, {"shift": jnp.zeros(H)}, initial=pydso.Normal(np.array([M0]), np.array([S0])))


def exact_shifts(a, beta):
    r"""The optimum of E[-a x_H] + beta KL(Q || P) over chains: Q*(path) ∝ P(path) exp(a x_H / beta). With
    h_{t+1}(x') = E_P[exp(a x_H / beta) | x_{t+1} = x'] = exp(c_{t+1} x' + const), c_{t+1} = (a/beta) prod_{s>t}
    alpha_s (x_H is affine in x_{t+1} with that slope, plus Gaussian noise), the optimal step is
    P_t(x'|x) h_{t+1}(x') ∝ N(x'; m_t(x) + sigma_t^2 c_{t+1}, sigma_t^2): the mean shifts by sigma_t^2 c_{t+1}."""
    return np.array([SIGMA[t] ** 2 * a / beta * np.prod(ALPHA[t + 1 :]) for t in range(H)])


def pretrained_final_moments():
    m, v = M0, S0**2
    for t in range(H):
        m, v = ALPHA[t] * m + BIAS[t], ALPHA[t] ** 2 * v + SIGMA[t] ** 2
    return m, v


def minimize(problem, theta, *, key, lr, steps, n, **kwargs):
    method = pydso.Gradient(optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, 10, steps, lr * 1e-3)), n=n)
    with jax.numpy_dtype_promotion("standard"):
        return pydso.minimize(problem, theta, key=key, method=method, steps=steps, progress=False, **kwargs)


def test_linear_gaussian_chain_tunes_to_the_closed_form_drift():
    a, beta = 1.5, 0.5
    p = generative(linear_chain(), lambda x: a * x[0], beta=beta)
    assert isinstance(p, AbstractConstructedProblem)
    assert p.problem.time_varying and isinstance(p.problem.system, pydso.GaussianChain)
    out = minimize(p.problem, p.theta0, key=jax.random.key(0), lr=0.1, steps=250, n=16)
    shifts = np.asarray(out.theta["shift"])
    exact = exact_shifts(a, beta)
    np.testing.assert_allclose(shifts, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())
    # min J = -beta log Z with log Z = log E_P[exp(a x_H / beta)] = (a/beta) m + (a/beta)^2 v / 2 (x_H Gaussian)
    m, v = pretrained_final_moments()
    c = a / beta
    r = p.result(out.theta, key=jax.random.key(1), n=4000)
    J_min = -beta * (c * m + c**2 * v / 2)
    assert abs(r.objective - J_min) < 4 * r.reward_stderr, (r.objective, J_min)  # KL is deterministic here
    # the path KL is deterministic here: sum_t delta_t^2 / (2 sigma_t^2)
    assert r.kl == pytest.approx(np.sum(shifts**2 / (2 * SIGMA**2)), rel=1e-9)
    assert r.kl_stderr < 1e-8


def test_tuned_ddpm_matches_the_tilted_component_weights():
    mix = GaussianMixture([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]], 0.4)
    with jax.numpy_dtype_promotion("standard"):
        model = pretrain_ddpm(
            mix.sample(key=jax.random.key(0), n=20000),
            key=jax.random.key(1),
            steps=1500,
            horizon=20,
            width=48,
            batch=128,
        )
    a, beta = jnp.array([1.0, 0.5]), 2.0
    p = generative(model, lambda x: a @ x, beta=beta)

    # reference: the pretrained model's own samples, importance-weighted by exp(r / beta)
    x0 = np.asarray(model.sample(key=jax.random.key(2), n=8000))
    r0 = x0 @ np.asarray(a)
    w = np.exp((r0 - r0.max()) / beta)
    w /= w.sum()
    np.testing.assert_allclose(tilted_weights(r0, beta), w, rtol=1e-12)
    pretrained = mix.component_weights(x0)
    target = mix.component_weights(x0, w)
    assert np.all(np.abs(pretrained - 0.25) < 0.05), pretrained  # the pretraining found all four components
    assert target[3] > 0.5 and target[0] < 0.1, target  # a strong tilt

    kept = []
    steps = 100
    out = minimize(
        p.problem,
        p.theta0,
        key=jax.random.key(3),
        lr=6e-3,
        steps=steps,
        n=64,
        callback=lambda info: kept.append(info.theta) if info.step % 25 == 24 else None,
    )
    r = p.result(out.theta, key=jax.random.key(4), n=2000)
    tuned = mix.component_weights(r.samples)
    print(
        f"component weights: pretrained {np.round(pretrained, 3)}, tilted {np.round(target, 3)}, "
        f"tuned {np.round(tuned, 3)}"
    )
    assert np.all(np.abs(tuned - target) < 0.05), (tuned, target)

    # reward rises, KL stays bounded by (a small multiple of) the optimum's KL(Q*||P) = E_w[r]/beta - log Z
    log_z = np.log(np.mean(np.exp((r0 - r0.max()) / beta))) + r0.max() / beta
    kl_star = np.sum(w * r0) / beta - log_z
    start = p.result(p.theta0, key=jax.random.key(5), n=2000)
    assert start.kl == 0.0
    history = [p.result(th, key=jax.random.key(5), n=2000) for th in kept]
    print("reward / KL along training:", [(round(h.reward, 3), round(h.kl, 3)) for h in history], "KL*", kl_star)
    assert all(h.reward > start.reward + 1.0 for h in history)
    assert all(0.0 < h.kl < 2.0 * kl_star for h in history)
    assert r.reward > start.reward + 1.0
    # and the objective is near its minimum -beta log Z (a DSO upper bound up to Monte-Carlo error)
    assert -beta * log_z - 4 * r.reward_stderr < r.objective < -beta * log_z + 0.25


def test_reward_and_beta_are_checked():
    chain = linear_chain()
    for beta in (0.0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(pydso.ProblemError, match="beta"):
            generative(chain, lambda x: x[0], beta=beta)
    with pytest.raises(pydso.ProblemError, match="reward must return a scalar"):
        generative(chain, lambda x: x, beta=1.0)
    with pytest.raises(pydso.ProblemError, match="reward"):
        generative(chain, lambda x: x[5, 5], beta=1.0)
    with pytest.raises(pydso.ProblemError, match="reward must be a callable"):
        generative(chain, 3.0, beta=1.0)
    with pytest.raises(pydso.ProblemError, match="chain"):
        generative(lambda t, x: x, lambda x: x[0], beta=1.0)
    with pytest.raises(pydso.ProblemError, match="tilted|beta"):
        tilted_weights(np.zeros(3), beta=0.0)


def test_chain_and_data_are_checked():
    with pytest.raises(pydso.ProblemError, match="scale"):
        DenoisingChain(lambda t, x, p: x, np.array([0.5, 0.0]), {}, dim=1)
    with pytest.raises(pydso.ProblemError, match="scale"):
        DenoisingChain(lambda t, x, p: x, np.ones((2, 2, 2)), {}, dim=1)
    with pytest.raises(pydso.ProblemError, match="dim"):
        DenoisingChain(lambda t, x, p: x, np.ones(3), {})
    with pytest.raises(pydso.ProblemError, match="mean_fn"):
        DenoisingChain("mean", np.ones(3), {}, dim=1)
    with pytest.raises(pydso.ProblemError, match="weights"):
        GaussianMixture([[0.0, 0.0], [1.0, 1.0]], 0.3, weights=[0.7, 0.7])
    with pytest.raises(pydso.ProblemError, match="std"):
        GaussianMixture([[0.0, 0.0]], -0.3)
    with pytest.raises(pydso.ProblemError, match="data"):
        pretrain_ddpm(np.zeros(10), key=jax.random.key(0))
    with pytest.raises(pydso.ProblemError, match="data"):
        pretrain_ddpm(np.full((10, 2), np.nan), key=jax.random.key(0))
