"""pydso.divergences against closed forms computed independently here (numpy / scipy), never Monte Carlo."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import pydso
from pydso import divergences as dv


def _np_kl(mp, Sp, mq, Sq):
    """KL(N(mp, Sp) || N(mq, Sq)) by the textbook formula with explicit inverses and determinants."""
    d = mp.shape[0]
    iq = np.linalg.inv(Sq)
    dm = mq - mp
    return 0.5 * (np.trace(iq @ Sp) + dm @ iq @ dm - d + np.log(np.linalg.det(Sq)) - np.log(np.linalg.det(Sp)))


def _random_tril(rng, d):
    L = np.tril(rng.normal(size=(d, d)))
    L[np.diag_indices(d)] = np.abs(L[np.diag_indices(d)]) + 0.5
    return L


def test_gaussian_kl_full_and_diagonal():
    rng = np.random.default_rng(0)
    d = 3
    mp, mq = rng.normal(size=d), rng.normal(size=d)
    Lp, Lq = _random_tril(rng, d), _random_tril(rng, d)
    ref = _np_kl(mp, Lp @ Lp.T, mq, Lq @ Lq.T)
    np.testing.assert_allclose(dv.gaussian_kl(mp, Lp, mq, Lq), ref, rtol=1e-12)
    # diagonal factors given as vectors, and mixed vector / matrix
    sp, sq = np.abs(rng.normal(size=d)) + 0.3, np.abs(rng.normal(size=d)) + 0.3
    ref = _np_kl(mp, np.diag(sp**2), mq, np.diag(sq**2))
    np.testing.assert_allclose(dv.gaussian_kl(mp, sp, mq, sq), ref, rtol=1e-12)
    np.testing.assert_allclose(dv.gaussian_kl(mp, np.diag(sp), mq, sq), ref, rtol=1e-12)
    np.testing.assert_allclose(dv.gaussian_kl(mp, Lp, mp, Lp), 0.0, atol=1e-12)
    # 1-D scalars
    np.testing.assert_allclose(
        dv.gaussian_kl(0.3, 0.5, -0.2, 1.5), np.log(1.5 / 0.5) + (0.25 + 0.25) / (2 * 2.25) - 0.5, rtol=1e-12
    )
    with pytest.raises(pydso.ProblemError, match="mean_q"):
        dv.gaussian_kl(mp, Lp, mq[:2], Lq[:2, :2])


def test_gaussian_entropy_matches_scipy():
    rng = np.random.default_rng(1)
    L = _random_tril(rng, 4)
    ref = scipy.stats.multivariate_normal(np.zeros(4), L @ L.T).entropy()
    np.testing.assert_allclose(dv.gaussian_entropy(L), ref, rtol=1e-12)
    s = np.array([0.2, 1.0, 3.0])
    ref = scipy.stats.multivariate_normal(np.zeros(3), np.diag(s**2)).entropy()
    np.testing.assert_allclose(dv.gaussian_entropy(s), ref, rtol=1e-12)
    np.testing.assert_allclose(dv.gaussian_entropy(0.7, dim=2), scipy.stats.norm(0, 0.7).entropy() * 2, rtol=1e-12)


def _mean(x, theta):
    return theta["A"] @ x + theta["b"]


def test_transition_kl_and_entropy_gaussian_chain_diagonal():
    theta_p = {"A": jnp.array([[0.9, 0.1], [0.0, 0.8]]), "b": jnp.array([0.1, -0.2]), "s": jnp.array([0.3, 0.5])}
    theta_q = {"A": jnp.array([[1.0, 0.0], [0.2, 0.7]]), "b": jnp.array([0.0, 0.1]), "s": jnp.array([0.4, 0.4])}
    chain = pydso.GaussianChain(_mean, lambda x, th: th["s"])
    x = jnp.array([0.5, -1.0])
    mp, mq = np.asarray(_mean(x, theta_p)), np.asarray(_mean(x, theta_q))
    Sp, Sq = np.diag(np.asarray(theta_p["s"]) ** 2), np.diag(np.asarray(theta_q["s"]) ** 2)
    np.testing.assert_allclose(dv.transition_kl(chain, theta_p, chain, theta_q, 0.0, x), _np_kl(mp, Sp, mq, Sq), 1e-12)
    ref_h = scipy.stats.multivariate_normal(mp, Sp).entropy()
    np.testing.assert_allclose(dv.transition_entropy(chain, theta_p, 0.0, x), ref_h, rtol=1e-12)
    # as cost terms, and differentiable (gradient against central finite differences)
    kl_cost = dv.transition_kl_cost(chain, chain, theta_q, weight=0.5)
    ent_cost = dv.transition_entropy_cost(chain, weight=2.0)
    np.testing.assert_allclose(kl_cost(x, theta_p), 0.5 * _np_kl(mp, Sp, mq, Sq), rtol=1e-12)
    np.testing.assert_allclose(ent_cost(x, theta_p), -2.0 * ref_h, rtol=1e-12)
    g = jax.grad(kl_cost, argnums=1)(x, theta_p)["b"]
    eps = 1e-6

    def shifted(i, h):
        return kl_cost(x, {**theta_p, "b": theta_p["b"].at[i].add(h)})

    fd = [(shifted(i, eps) - shifted(i, -eps)) / (2 * eps) for i in range(2)]
    np.testing.assert_allclose(g, np.array(fd), rtol=1e-6)
    assert len(inspect.signature(dv.transition_kl_cost(chain, chain, theta_q, time_varying=True)).parameters) == 3


def test_transition_kl_gaussian_chain_full_covariance():
    try:
        pydso.GaussianChain(_mean, scale_tril=jnp.eye(2))
    except TypeError:
        pytest.fail("GaussianChain(scale_tril=...) is not available yet (helper T1)")
    rng = np.random.default_rng(2)
    Lp, Lq = _random_tril(rng, 2), _random_tril(rng, 2)
    theta = {"A": jnp.array([[0.9, 0.1], [0.0, 0.8]]), "b": jnp.array([0.1, -0.2])}
    p = pydso.GaussianChain(_mean, scale_tril=jnp.asarray(Lp))
    q = pydso.GaussianChain(_mean, scale_tril=jnp.asarray(Lq))
    x = jnp.array([0.5, -1.0])
    m = np.asarray(_mean(x, theta))
    np.testing.assert_allclose(
        dv.transition_kl(p, theta, q, theta, 0.0, x), _np_kl(m, Lp @ Lp.T, m, Lq @ Lq.T), rtol=1e-12
    )
    ref_h = scipy.stats.multivariate_normal(m, Lp @ Lp.T).entropy()
    np.testing.assert_allclose(dv.transition_entropy(p, theta, 0.0, x), ref_h, rtol=1e-12)


def test_transition_kl_sde_is_the_girsanov_rate():
    """Two Euler–Maruyama steps with the same diffusion: KL = dt/2 ||(f_p - f_q)/g||^2."""
    dt = 0.05

    def drift(t, x, theta):
        return -theta * x + jnp.sin(t)

    def diffusion(t, x, theta):
        return jnp.array([0.5, 0.8])

    sde = pydso.SDESystem(drift, diffusion, dt=dt)
    x, t = jnp.array([1.0, -2.0]), 0.3
    fp, fq = np.asarray(drift(t, x, 1.5)), np.asarray(drift(t, x, 0.5))
    ref = 0.5 * dt * np.sum(((fp - fq) / np.array([0.5, 0.8])) ** 2)
    np.testing.assert_allclose(dv.transition_kl(sde, 1.5, sde, 0.5, t, x), ref, rtol=1e-12)
    ref_h = scipy.stats.multivariate_normal(np.zeros(2), np.diag(np.array([0.5, 0.8]) ** 2 * dt)).entropy()
    np.testing.assert_allclose(dv.transition_entropy(sde, 1.5, t, x), ref_h, rtol=1e-12)


def test_transition_kl_tabular_exact_sum():
    P = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    Q = np.array([[0.25, 0.25, 0.5], [0.3, 0.3, 0.4], [0.0, 0.5, 0.5]])
    cp = pydso.TabularChain(lambda th: jnp.asarray(P) * th)
    cq = pydso.TabularChain(lambda th: jnp.asarray(Q))
    for x in range(3):
        p, q = P[x], Q[x]
        m = p > 0
        ref = np.inf if np.any((q == 0) & m) else np.sum(p[m] * np.log(p[m] / q[m]))
        assert float(dv.transition_kl(cp, 1.0, cq, None, 0.0, jnp.int32(x))) == pytest.approx(ref, rel=1e-12)
        np.testing.assert_allclose(dv.transition_entropy(cp, 1.0, 0.0, jnp.int32(x)), scipy.stats.entropy(p), 1e-12)
    assert not np.isinf(float(dv.transition_kl(cp, 1.0, cq, None, 0.0, jnp.int32(0))))
    assert np.isinf(float(dv.transition_kl(cq, None, cp, 1.0, 0.0, jnp.int32(0))))


def test_no_closed_form_raises_problem_error():
    det = pydso.DeterministicMap(lambda x, th: th * x)
    chain = pydso.GaussianChain(lambda x, th: th * x, 1.0)
    with pytest.raises(pydso.ProblemError, match="no closed-form"):
        dv.transition_kl(det, 1.0, chain, 1.0, 0.0, jnp.ones(2))
    with pytest.raises(pydso.ProblemError, match="no closed-form"):
        dv.transition_entropy(det, 1.0, 0.0, jnp.ones(2))
    tab = pydso.TabularChain(lambda th: jnp.eye(2))
    with pytest.raises(pydso.ProblemError, match="TabularChain"):
        dv.transition_kl(tab, None, chain, 1.0, 0.0, jnp.ones(2))
    with pytest.raises(pydso.ProblemError, match="system_p"):
        dv.transition_kl("chain", None, chain, 1.0, 0.0, jnp.ones(2))
    with pytest.raises(pydso.ProblemError, match="weight"):
        dv.transition_kl_cost(chain, chain, 1.0, weight=float("nan"))
