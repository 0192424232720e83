"""Honest intervals in system identification: the residual whiteness test, the AR sandwich covariance for coloured
residuals (against the dense Toeplitz formula and in a 200-experiment coverage study with AR(1), phi = 0.9, noise),
and non-identifiable parameters (issue 11: rank-deficient Jacobians, no degrees of freedom)."""

import warnings

import numpy as np
import pytest

import pydso  # noqa: F401  (float64)
from pydso.data import make_dataset
from pydso.problems import sysid as S


def first_order(x, u, th):
    return th["a"] * x + th["b"] * u


FIRST = S.DiscreteModel(first_order, None, {"a": 0.5, "b": 0.5}, x0=[0.0])
A, B, T, E = 0.8, 1.0, 300, 200


def experiments(phi, seed):
    """E experiments of x_{k+1} = A x_k + B u_k, y = x + v with AR(1) noise v (coefficient phi, std 0.3)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(E, T))
    x = np.zeros((E, T))
    for k in range(T - 1):
        x[:, k + 1] = A * x[:, k] + B * u[:, k]
    w = rng.normal(size=(E, T))
    v = np.zeros((E, T))
    v[:, 0] = w[:, 0] / np.sqrt(1 - phi**2)
    for k in range(1, T):
        v[:, k] = phi * v[:, k - 1] + w[:, k]
    y = x + 0.3 * np.sqrt(1 - phi**2) * v
    return make_dataset(y[..., None], input=u[..., None], output=y[..., None], dt=1.0)


def coverage(results):
    inside = np.array([(r.ci_low <= [A, B]) & ([A, B] <= r.ci_high) for r in results])
    return float(inside.mean())


def test_coverage_with_white_and_ar1_noise_200_experiments():
    """200 simulated experiments per noise kind, fitted as one vmapped batch (fit_batch). White noise: the
    whiteness test passes (about 99% of fits) and the intervals cover; AR(1) with phi = 0.9: the whiteness test
    fails in every fit, the white-residual covariance under-covers badly, the AR sandwich ('auto') covers."""
    white = S.fit_batch(FIRST, experiments(0.0, 1))
    assert 0.88 <= coverage(white) <= 0.99, coverage(white)
    assert np.mean([r.whiteness.passed for r in white]) >= 0.9
    coloured = experiments(0.9, 2)
    ar = S.fit_batch(FIRST, coloured)
    assert all(not r.whiteness.passed for r in ar) and all(r.covariance.startswith("ar") for r in ar)
    assert all(r.whiteness.lag1[0] > 0.7 for r in ar) and all(any("whiteness" in w for w in r.warnings) for r in ar)
    assert 0.88 <= coverage(ar) <= 0.99, coverage(ar)
    naive = S.fit_batch(FIRST, coloured, covariance="white")
    assert coverage(naive) < 0.8, coverage(naive)


def test_ar_sandwich_matches_the_dense_toeplitz_formula_and_reduces_to_white():
    rng = np.random.default_rng(0)
    Ep, Tp, ny, p = 2, 50, 2, 3
    J = rng.normal(size=(Ep * Tp * ny, p))
    r = rng.normal(size=(Ep, Tp, ny))
    for j in range(ny):  # make channel 0 strongly AR(1)
        if j == 0:
            for t in range(1, Tp):
                r[:, t, 0] += 0.8 * r[:, t - 1, 0]
    dof = r.size - p
    M, orders, coefs = S.ar_sandwich(J, r.ravel(), (Ep, Tp, ny), dof=dof)
    assert orders[0] >= 1
    Jr = J.reshape(Ep, Tp, ny, p)
    ref = np.zeros((p, p))
    for j in range(ny):
        R = S.autocovariance(r[..., j], max(orders[j], 1))
        g = np.zeros(Tp)
        g[: orders[j] + 1] = R[: orders[j] + 1]
        for k in range(orders[j] + 1, Tp):
            g[k] = coefs[j] @ g[k - orders[j] : k][::-1]
        g *= r.size / dof
        Sigma = g[np.abs(np.subtract.outer(np.arange(Tp), np.arange(Tp)))]
        for e in range(Ep):
            ref += Jr[e, :, j].T @ Sigma @ Jr[e, :, j]
    np.testing.assert_allclose(M, ref, rtol=1e-10)
    # white residuals (order 0): per channel sigma_j^2 J_j^T J_j, sigma_j^2 = |r_j|^2 / (E T) * N / dof
    w = rng.normal(size=Ep * Tp * ny)
    Mw, ow, _ = S.ar_sandwich(J, w, (Ep, Tp, ny), dof=dof, q_max=0)
    assert ow == [0, 0]
    Jc = J.reshape(Ep, Tp, ny, p)
    wc = w.reshape(Ep, Tp, ny)
    ref_w = sum(
        np.sum(wc[..., j] ** 2) / (Ep * Tp) * w.size / dof * Jc[:, :, j].reshape(-1, p).T @ Jc[:, :, j].reshape(-1, p)
        for j in range(ny)
    )
    np.testing.assert_allclose(Mw, ref_w, rtol=1e-10)


def test_whiteness_test_against_known_autocorrelation():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(4, 2000, 1))
    u = rng.normal(size=(4, 2000, 1))
    wt = S.whiteness_test(e, u)
    assert wt.passed and wt.band == pytest.approx(2.5758293 / np.sqrt(8000), rel=1e-6)
    ar = e.copy()
    for t in range(1, 2000):
        ar[:, t] += 0.5 * ar[:, t - 1]
    wa = S.whiteness_test(ar, u)
    assert not wa.white[0] and wa.lag1[0] == pytest.approx(0.5, abs=0.03)  # rho(1) of AR(1) = phi
    assert wa.acf[0, 1] == pytest.approx(0.25, abs=0.03)  # rho(2) = phi^2
    leak = e + 0.3 * np.roll(u, 2, axis=1)  # residuals that still contain the input two samples back
    wl = S.whiteness_test(leak, u)
    assert not wl.independent[0, 0] and int(wl.xlags[np.argmax(np.abs(wl.xcf[0, 0]))]) == 2


def test_non_identifiable_parameters_get_infinite_intervals_and_a_warning():
    rng = np.random.default_rng(3)
    T0 = 60
    zero_u = np.zeros((1, T0))
    y = 2.0 * 0.8 ** np.arange(T0)[None] + 0.01 * rng.normal(size=(1, T0))  # free response: b is invisible
    ds = make_dataset(y[..., None], input=zero_u[..., None], output=y[..., None], dt=1.0)
    with pytest.warns(S.SysIdWarning, match=r"\['b'\] are not identifiable"):
        r = S.fit(FIRST, ds)
    ib, ia = r.names.index("b"), r.names.index("a")
    assert not r.identifiable[ib] and r.identifiable[ia] and not r.converged and "NOT IDENTIFIABLE" in r.message
    assert r.stderr[ib] == np.inf and r.ci_low[ib] == -np.inf and r.ci_high[ib] == np.inf
    assert np.isfinite(r.stderr[ia]) and abs(r.as_dict()["a"] - 0.8) < 3 * r.stderr[ia]
    zeros = make_dataset(np.zeros((1, T0, 1)), input=np.zeros((1, T0, 1)), output=np.zeros((1, T0, 1)), dt=1.0)
    with pytest.warns(S.SysIdWarning, match="not identifiable"):
        rz = S.fit(FIRST, zeros)
    assert not rz.identifiable.any() and np.all(rz.stderr == np.inf) and not rz.converged
    tiny = make_dataset(y[:, :2, None], input=rng.normal(size=(1, 2, 1)), output=y[:, :2, None], dt=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(S.SysIdError, match="at least 3"):
            S.fit(FIRST, tiny)
    three = make_dataset(y[:, :3, None], input=rng.normal(size=(1, 3, 1)), output=y[:, :3, None], dt=1.0)
    p3 = S.sysid(FIRST, three)  # 3 samples, 3 unknowns (a, b, x0)
    r3 = p3.result(p3.theta0, code=0)
    assert not r3.identifiable.any() and not r3.converged and "no degrees of freedom" in r3.warnings[0]
