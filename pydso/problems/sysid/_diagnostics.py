r"""Residual diagnostics of a fit: the whiteness test (:func:`whiteness_test`, :class:`Whiteness`) and the covariance
of least-squares estimates under correlated residuals (:func:`ar_sandwich`), plus the identifiability check of the
Jacobian (:func:`identifiability`).

**Whiteness.** For residuals :math:`\varepsilon_t` of one output channel (pooled over episodes, :math:`N` samples)
the sample autocorrelation :math:`\hat\rho(k) = \hat R(k)/\hat R(0)`, :math:`\hat R(k) = \frac1N\sum_t
\varepsilon_t\varepsilon_{t+k}`, of white residuals is approximately :math:`\mathcal N(0, 1/N)`: the 99% band is
:math:`\pm 2.576/\sqrt N` and the portmanteau statistic :math:`Q = N\sum_{k=1}^{M}\hat\rho(k)^2` is approximately
:math:`\chi^2_M`. Residuals independent of past inputs have cross-correlations :math:`\hat\rho_{\varepsilon u}(\tau)`,
:math:`\tau = -M..M`, inside the same band and :math:`Q_{\varepsilon u} = N\sum_\tau \hat\rho_{\varepsilon u}(\tau)^2`
approximately :math:`\chi^2_{2M+1}` (for a white input; a coloured input makes the cross test conservative
only approximately). The test fails at level ``alpha`` (default 1%) when :math:`Q` exceeds the
:math:`\chi^2` quantile (Ljung 1999, §16.6).

**Correlated residuals.** The least-squares estimate :math:`\hat\theta` with Jacobian :math:`\mathbf J` has the
sandwich covariance :math:`(\mathbf J^\top\mathbf J)^{-1}\mathbf J^\top\Sigma\mathbf J(\mathbf J^\top\mathbf J)^{-1}`
where :math:`\Sigma` is the covariance of the residual vector. :func:`ar_sandwich` models each output channel's
residuals as an autoregressive process AR(q) (order by AIC, coefficients by Yule–Walker, pooled over episodes,
independent episodes), whose autocovariances fill the Toeplitz matrix :math:`\Sigma` exactly; :math:`\mathbf
J^\top\Sigma\mathbf J` is then computed by FFT (circulant embedding), :math:`O(pN\log N)`. With q = 0 it is exactly
:math:`\hat\sigma^2(\mathbf J^\top\mathbf J)^{-1}`. Not for residuals whose correlation is not captured by a
low-order AR model (use a longer record, or model the noise).

References: L. Ljung, *System Identification: Theory for the User*, 2nd ed. 1999 (§9, §16.6); G. M. Ljung and
G. E. P. Box, "On a measure of lack of fit in time series models", Biometrika 1978; P. J. Brockwell and R. A.
Davis, *Time Series: Theory and Methods*, 1991 (Yule–Walker, Durbin–Levinson).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = ["Whiteness", "whiteness_test", "ar_sandwich", "identifiability", "autocovariance"]


@dataclasses.dataclass
class Whiteness:
    """Outcome of :func:`whiteness_test` (per output channel ``j``, input channel ``i``).

    ``lags`` ``(M,)`` = 1..M; ``acf`` ``(ny, M)`` residual autocorrelation; ``band`` the 99% (``1 - alpha``)
    half-width :math:`z_{1-\\alpha/2}/\\sqrt N`; ``q``/``q_crit`` ``(ny,)`` the portmanteau statistic and its
    :math:`\\chi^2_M` quantile; ``white`` ``(ny,)``; ``xlags`` ``(2M+1,)``; ``xcf`` ``(ny, nu, 2M+1)`` residual-input
    cross-correlation (positive lag: the residual after the input); ``xq``/``xq_crit`` ``(ny, nu)``;
    ``independent`` ``(ny, nu)``; ``passed``: every test passed. ``lag1`` ``(ny,)`` is ``acf[:, 0]``.
    """

    lags: np.ndarray
    acf: np.ndarray
    band: float
    q: np.ndarray
    q_crit: float
    white: np.ndarray
    xlags: np.ndarray
    xcf: np.ndarray
    xq: np.ndarray
    xq_crit: float
    independent: np.ndarray
    alpha: float
    n: int

    @property
    def passed(self) -> bool:
        return bool(np.all(self.white) and np.all(self.independent))

    @property
    def lag1(self) -> np.ndarray:
        return self.acf[:, 0] if self.acf.shape[1] else np.zeros(self.acf.shape[0])

    def summary(self) -> str:
        """One line per output channel: lag-1 autocorrelation, share of lags outside the band, verdicts."""
        lines = []
        for j in range(self.acf.shape[0]):
            out = float(np.mean(np.abs(self.acf[j]) > self.band)) if self.acf.shape[1] else 0.0
            lines.append(
                f"output {j}: residual autocorrelation lag1={self.lag1[j]:.3f}, {100 * out:.0f}% of lags "
                f"1..{len(self.lags)} "
                f"outside +-{self.band:.3g}, Q={self.q[j]:.1f} (crit {self.q_crit:.1f}) -> "
                f"{'white' if self.white[j] else 'NOT white'}; input cross-correlation "
                f"{'ok' if np.all(self.independent[j]) else 'NOT independent'} "
                f"(Q={np.array2string(self.xq[j], precision=1)}, crit {self.xq_crit:.1f})"
            )
        return "\n".join(lines)


def _xcorr(a, b, max_lag):
    """Sum over episodes of sum_t a[e, t] b[e, t + k] for k = -max_lag..max_lag; a, b ``(E, T)``."""
    E, T = a.shape
    n = 1 << int(np.ceil(np.log2(2 * T)))
    fa = np.fft.rfft(a, n=n, axis=1)
    fb = np.fft.rfft(b, n=n, axis=1)
    c = np.fft.irfft(np.conj(fa) * fb, n=n, axis=1).sum(axis=0)  # c[k] = sum_t a_t b_{t+k}
    return np.concatenate([c[n - max_lag :], c[: max_lag + 1]])


def autocovariance(x, max_lag: int) -> np.ndarray:
    """Biased sample autocovariance :math:`\\hat R(k) = \\frac1N\\sum_{e,t} x_{e,t} x_{e,t+k}`, k = 0..max_lag, of
    ``x`` ``(E, T)`` pooled over episodes (``N = E T``; ``x`` should have zero mean)."""
    x = np.asarray(x, float)
    return _xcorr(x, x, max_lag)[max_lag:] / x.size


@functools.lru_cache(maxsize=256)
def _quantile(dist: str, p: float, df: int) -> float:
    from scipy import stats

    return float(stats.norm.ppf(p) if dist == "norm" else stats.chi2.ppf(p, df))


def whiteness_test(residuals, inputs, *, max_lag: int | None = None, alpha: float = 0.01) -> Whiteness:
    """The residual whiteness and input-independence tests (see the module documentation).

    **Arguments:** ``residuals`` ``(E, T, ny)`` (any units), ``inputs`` ``(E, T, nu)`` (``nu`` may be 0),
    ``max_lag`` ``M`` (default ``min(25, T // 4)``), ``alpha`` the test level.

    **Returns:** a :class:`Whiteness`.
    """
    r = np.asarray(residuals, float)
    u = np.asarray(inputs, float)
    E, T, ny = r.shape
    nu = u.shape[-1]
    M = int(min(25, max(T // 4, 1))) if max_lag is None else int(max_lag)
    N = E * T
    r = r - r.mean(axis=(0, 1))
    u = u - u.mean(axis=(0, 1)) if nu else u
    band = _quantile("norm", 1 - alpha / 2, 0) / np.sqrt(N)
    acf = np.zeros((ny, M))
    xcf = np.zeros((ny, nu, 2 * M + 1))
    for j in range(ny):
        R = autocovariance(r[..., j], M)
        acf[j] = R[1:] / R[0] if R[0] > 0 else 0.0
        for i in range(nu):
            su = np.sqrt(np.mean(u[..., i] ** 2))
            den = np.sqrt(R[0]) * su * N
            xcf[j, i] = _xcorr(u[..., i], r[..., j], M) / den if den > 0 else 0.0
    q = N * np.sum(acf**2, axis=1)
    xq = N * np.sum(xcf**2, axis=2)
    q_crit = _quantile("chi2", 1 - alpha, M)
    xq_crit = _quantile("chi2", 1 - alpha, 2 * M + 1)
    return Whiteness(
        lags=np.arange(1, M + 1),
        acf=acf,
        band=band,
        q=q,
        q_crit=q_crit,
        white=q <= q_crit,
        xlags=np.arange(-M, M + 1),
        xcf=xcf,
        xq=xq,
        xq_crit=xq_crit,
        independent=xq <= xq_crit,
        alpha=alpha,
        n=N,
    )


def _levinson(R, q_max):
    """Durbin–Levinson: AR coefficients ``phi[q]`` and innovation variances ``v[q]`` for orders 0..q_max."""
    phis, v = [np.zeros(0)], [R[0]]
    phi = np.zeros(0)
    for q in range(1, q_max + 1):
        if v[-1] <= 0:
            break
        k = (R[q] - phi @ R[1:q][::-1]) / v[-1] if q > 1 else R[1] / R[0]
        phi = np.concatenate([phi - k * phi[::-1], [k]])
        phis.append(phi)
        v.append(v[-1] * (1 - k * k))
    return phis, np.asarray(v)


def _ar_autocovariance(R, phi, T):
    """Autocovariances 0..T-1 of the Yule–Walker AR model: equal to ``R`` for lags 0..q, then the AR recursion."""
    q = len(phi)
    g = np.zeros(T)
    g[: q + 1] = R[: min(q + 1, T)]
    for k in range(q + 1, T):
        g[k] = phi @ g[k - q : k][::-1]
    return g


def ar_sandwich(J, r, shape, *, dof: int, q_max: int = 20):
    """``(M, orders, phis)``: the middle matrix :math:`\\mathbf J^\\top\\Sigma\\mathbf J` of the sandwich covariance
    for residuals that are AR(q) per output channel (see the module documentation).

    **Arguments:** ``J`` ``(N, p)`` Jacobian and ``r`` ``(N,)`` residuals ordered as ``shape`` = ``(E, T, ny)``;
    ``dof`` the degrees of freedom (the autocovariances are scaled by ``N / dof``, so that q = 0 reproduces
    :math:`\\hat\\sigma^2\\mathbf J^\\top\\mathbf J` with :math:`\\hat\\sigma^2 = \\|r\\|^2/dof`); ``q_max`` the
    largest AR order tried (AIC, at most ``T // 10``).

    **Returns:** ``M`` ``(p, p)``, the chosen order per channel and their coefficients.
    """
    E, T, ny = shape
    p = J.shape[1]
    Jr = np.asarray(J, float).reshape(E, T, ny, p)
    rr = np.asarray(r, float).reshape(E, T, ny)
    N = E * T * ny
    Mmat = np.zeros((p, p))
    orders, coefs = [], []
    n = 1 << int(np.ceil(np.log2(2 * T)))
    for j in range(ny):
        x = rr[..., j]
        qm = int(max(0, min(q_max, T // 10)))
        R = autocovariance(x, max(qm, 1))
        if R[0] <= 0:
            orders.append(0)
            coefs.append(np.zeros(0))
            continue
        phis, v = _levinson(R, qm)
        nn = x.size
        aic = nn * np.log(np.maximum(v, 1e-300)) + np.log(nn) * np.arange(len(v))  # BIC
        q = int(np.argmin(aic))
        orders.append(q)
        coefs.append(phis[q])
        g = _ar_autocovariance(R, phis[q], T) * (N / max(dof, 1))
        c = np.zeros(n)
        c[:T] = g
        c[n - T + 1 :] = g[1:][::-1]
        fc = np.fft.rfft(c)
        Jj = Jr[:, :, j, :]  # (E, T, p)
        fJ = np.fft.rfft(Jj, n=n, axis=1)
        SJ = np.fft.irfft(fc[None, :, None] * fJ, n=n, axis=1)[:, :T]  # Sigma @ J per episode
        Mmat += np.einsum("etp,etq->pq", Jj, SJ)
    return 0.5 * (Mmat + Mmat.T), orders, coefs


def identifiability(Js, *, rcond: float = 1e-9):
    """Which columns of the column-scaled Jacobian ``Js`` ``(N, p)`` are identifiable: ``(ok (p,) bool, s)`` with
    ``s`` the singular values. A column is not identifiable if it is zero, or if more than 1% of its unit vector
    lies in the numerical null space of ``Js`` (right singular vectors with singular values below ``rcond`` times
    the largest, and the directions beyond ``N`` when there are fewer residuals than unknowns): a direction of the
    parameters the residuals do not see."""
    Js = np.asarray(Js, float)
    p = Js.shape[1]
    if p == 0:
        return np.ones(0, bool), np.zeros(0)
    ok = np.linalg.norm(Js, axis=0) > 0
    if Js.shape[0] == 0:
        return np.zeros(p, bool), np.zeros(0)
    _, s, vt = np.linalg.svd(Js, full_matrices=False)
    smax = s[0] if s.size else 0.0
    keep = vt[s > rcond * smax] if smax > 0 else np.zeros((0, p))
    null_share = 1.0 - np.sum(keep**2, axis=0)  # diagonal of the null-space projector
    ok &= null_share <= 0.01
    return ok, s
