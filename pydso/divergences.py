r"""Entropy and KL divergence of transition laws in closed form, and their use as cost terms.

Regularised DSO problems (DESIGN.md §1: "entropy/KL/regularisers are just cost terms") add to the step cost
:math:`L(x,\theta)` the divergence of the closed-loop transition :math:`P_\theta(\cdot \mid x)` from a reference
chain :math:`Q(\cdot \mid x)` (generative-model tuning: the pretrained denoising chain; trust regions) or minus the
entropy of :math:`P_\theta(\cdot \mid x)` (exploration). This module computes both in closed form wherever the
transition law has one:

* :class:`~pydso.GaussianChain` (diagonal ``scale`` or full ``scale_tril``):
  :math:`P(\cdot \mid x) = N(m(x), \Sigma(x))`, :math:`\Sigma = L L^\top`;
* :class:`~pydso.SDESystem`: its Euler–Maruyama transition
  :math:`N(x + f(t,x)\,dt,\ \operatorname{diag}(g(t,x)^2)\,dt)` (the density its ``log_prob`` uses);
* :class:`~pydso.TabularChain`: the row :math:`P(\cdot \mid x)` of the transition matrix (exact finite sums).

Other systems (:class:`~pydso.MarkovChain` with a user density, deterministic maps, ODEs) have no closed form and
raise :class:`~pydso.ProblemError`; estimate such a KL by Monte Carlo from ``log_prob`` instead.

The module sits in the ``systems`` part of the layer order: it imports only :mod:`pydso.systems` and the leaf
helpers, so that problems, estimators and optimisers can all use it.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ._errors import ProblemError
from ._typing import PyTree
from .systems import AbstractSystem, GaussianChain, Problem, SDESystem, TabularChain

__all__ = [
    "gaussian_kl",
    "gaussian_entropy",
    "gaussian_transition",
    "tabular_transition",
    "transition_kl",
    "transition_entropy",
    "transition_kl_cost",
    "transition_entropy_cost",
]

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------- Gaussians
def _as_tril(scale: jax.Array, d: int) -> jax.Array:
    """A ``(d, d)`` lower-triangular factor from a factor, a ``(d,)`` diagonal or a scalar standard deviation."""
    scale = jnp.asarray(scale)
    if scale.ndim == 2:
        return jnp.tril(scale)
    return jnp.diag(jnp.broadcast_to(scale, (d,)))


def _check_gaussian(mean: jax.Array, scale: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    mean = jnp.atleast_1d(jnp.asarray(mean))
    if mean.ndim != 1:
        raise ProblemError(f"{name}: the mean must be a vector (d,), got shape {mean.shape}")
    scale = jnp.asarray(scale)
    d = mean.shape[0]
    if scale.ndim == 2 and scale.shape != (d, d):
        raise ProblemError(f"{name}: scale_tril must have shape (d, d) = {(d, d)}, got {scale.shape}")
    if scale.ndim == 1 and scale.shape[0] not in (1, d):
        raise ProblemError(f"{name}: a diagonal scale must have shape (d,) = {(d,)}, got {scale.shape}")
    if scale.ndim > 2:
        raise ProblemError(f"{name}: scale_tril must be a scalar, (d,) or (d, d), got shape {scale.shape}")
    return mean, scale


def gaussian_entropy(scale_tril: jax.Array, dim: int | None = None) -> jax.Array:
    r"""Differential entropy of :math:`N(m, LL^\top)` in nats:

    .. math::
        H = \tfrac d2 (1 + \log 2\pi) + \sum_i \log |L_{ii}|.

    **Arguments:**

    - `scale_tril`: the lower-triangular factor :math:`L` ``(d, d)``; or a ``(d,)`` vector of standard deviations
      (diagonal covariance); or a scalar standard deviation, then ``dim`` gives :math:`d`.
    - `dim`: the dimension :math:`d` when ``scale_tril`` is a scalar (default 1).

    **Returns:**

    The entropy, a scalar. Differentiable in ``scale_tril``. The mean does not enter.
    """
    s = jnp.asarray(scale_tril)
    if s.ndim == 2:
        if s.shape[0] != s.shape[1]:
            raise ProblemError(f"gaussian_entropy: scale_tril must be square (d, d), got shape {s.shape}")
        diag = jnp.diagonal(s)
    elif s.ndim <= 1:
        diag = jnp.broadcast_to(s, (dim if dim is not None else max(s.size, 1),)) if s.ndim == 0 else s
    else:
        raise ProblemError(f"gaussian_entropy: scale_tril must be a scalar, (d,) or (d, d), got shape {s.shape}")
    d = diag.shape[0]
    return 0.5 * d * (1.0 + _LOG_2PI) + jnp.sum(jnp.log(jnp.abs(diag)))


def gaussian_kl(mean_p: jax.Array, scale_tril_p: jax.Array, mean_q: jax.Array, scale_tril_q: jax.Array) -> jax.Array:
    r"""KL divergence :math:`\mathrm{KL}(N(m_p, \Sigma_p) \,\|\, N(m_q, \Sigma_q))` with
    :math:`\Sigma = L L^\top`:

    .. math::
        \mathrm{KL} = \tfrac12\Big[\|L_q^{-1} L_p\|_F^2 + \|L_q^{-1}(m_q - m_p)\|^2 - d\Big]
        + \sum_i \log|(L_q)_{ii}| - \sum_i \log|(L_p)_{ii}|,

    which is :math:`\tfrac12[\operatorname{tr}(\Sigma_q^{-1}\Sigma_p) + (m_q-m_p)^\top\Sigma_q^{-1}(m_q-m_p) - d
    + \log\det\Sigma_q - \log\det\Sigma_p]` computed with triangular solves (no inverse is formed). When both
    factors are diagonal it reduces to the sum over coordinates of
    :math:`\log(s_q/s_p) + (s_p^2 + (m_p-m_q)^2)/(2 s_q^2) - \tfrac12`.

    **Arguments:**

    - `mean_p`, `mean_q`: means, shape ``(d,)`` (a scalar is a 1-D Gaussian).
    - `scale_tril_p`, `scale_tril_q`: lower-triangular factors ``(d, d)``, or ``(d,)`` / scalar standard
      deviations (diagonal covariance). The upper triangle of a ``(d, d)`` factor is ignored.

    **Returns:**

    The KL divergence in nats, a scalar :math:`\ge 0`, differentiable in all arguments.
    """
    mp, sp = _check_gaussian(mean_p, scale_tril_p, "gaussian_kl(mean_p, scale_tril_p)")
    mq, sq = _check_gaussian(mean_q, scale_tril_q, "gaussian_kl(mean_q, scale_tril_q)")
    if mp.shape != mq.shape:
        raise ProblemError(f"gaussian_kl: mean_p has shape {mp.shape} but mean_q has shape {mq.shape}")
    d = mp.shape[0]
    if sp.ndim < 2 and sq.ndim < 2:  # diagonal: coordinatewise
        sp, sq = jnp.broadcast_to(sp, (d,)), jnp.broadcast_to(sq, (d,))
        r = sp / sq
        z = (mq - mp) / sq
        return 0.5 * jnp.sum(r**2 + z**2 - 1.0) - jnp.sum(jnp.log(jnp.abs(r)))
    Lp, Lq = _as_tril(sp, d), _as_tril(sq, d)
    M = jax.scipy.linalg.solve_triangular(Lq, Lp, lower=True)
    z = jax.scipy.linalg.solve_triangular(Lq, mq - mp, lower=True)
    logdet = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(Lq)))) - jnp.sum(jnp.log(jnp.abs(jnp.diagonal(Lp))))
    return 0.5 * (jnp.sum(M**2) + jnp.sum(z**2) - d) + logdet


# --------------------------------------------------------------------------------------------- transitions
def _system(obj, name: str) -> AbstractSystem:
    if isinstance(obj, Problem):
        return obj.system
    if isinstance(obj, AbstractSystem):
        return obj
    raise ProblemError(f"{name} must be a pydso.Problem or a pydso system, got {type(obj).__name__}")


def _user_args(system, t, x, theta) -> tuple:
    """Arguments of the user callables: ``(t, x, theta)`` for time-varying chains, ``(x, theta)`` otherwise."""
    return (t, x, theta) if getattr(system, "time_varying", False) else (x, theta)


def gaussian_transition(system: AbstractSystem, theta: PyTree, t: float, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""The Gaussian transition :math:`P(\cdot \mid x) = N(m, LL^\top)` of a Gaussian system at ``(t, x)``.

    :class:`~pydso.GaussianChain`: :math:`m = ` ``mean_fn(x, theta)`` and the ``scale`` (diagonal) or
    ``scale_tril`` (full) factor; :class:`~pydso.SDESystem` (Euler–Maruyama): :math:`m = x + f(t,x)\,dt`,
    standard deviations :math:`g(t,x)\sqrt{dt}`.

    **Arguments:**

    - `system`: a :class:`~pydso.GaussianChain` or :class:`~pydso.SDESystem` (or a :class:`~pydso.Problem` with one).
    - `theta`: the parameters of the system.
    - `t`: the time of ``x`` (used by SDEs and time-varying chains; pass ``0.0`` otherwise).
    - `x`: the state, a vector ``(d,)`` (a scalar is treated as ``(1,)``).

    **Returns:**

    ``(mean, scale)``: the mean ``(d,)`` and either a ``(d,)`` vector of standard deviations (diagonal noise) or
    a ``(d, d)`` lower-triangular factor.
    """
    system = _system(system, "system")
    if isinstance(system, SDESystem):
        x = jnp.asarray(x)
        mean = x + system.drift(t, x, theta) * system.dt
        std = jnp.broadcast_to(system.diffusion(t, x, theta), jnp.shape(x)) * jnp.sqrt(system.dt)
        return jnp.ravel(mean), jnp.ravel(std)
    if isinstance(system, GaussianChain):
        args = _user_args(system, t, x, theta)
        mean = jnp.asarray(system.mean_fn(*args))
        tril = getattr(system, "scale_tril", None)
        if tril is not None:
            L = jnp.asarray(tril(*args) if callable(tril) else tril)
            return jnp.ravel(mean), L
        s = system.scale(*args) if callable(system.scale) else system.scale
        return jnp.ravel(mean), jnp.ravel(jnp.broadcast_to(jnp.asarray(s), jnp.shape(mean)))
    raise ProblemError(
        f"system: {type(system).__name__} has no closed-form Gaussian transition; closed forms exist for "
        "GaussianChain, SDESystem (Euler–Maruyama) and TabularChain. Estimate the KL/entropy by Monte Carlo "
        "from log_prob instead"
    )


def tabular_transition(system: AbstractSystem, theta: PyTree, t: float, x: jax.Array) -> jax.Array:
    r"""The row :math:`P(\cdot \mid x, \theta)` of a :class:`~pydso.TabularChain`, shape ``(S,)``.

    **Arguments:** as :func:`gaussian_transition`, with ``x`` an integer state.

    **Returns:**

    The transition probabilities from ``x``, ``(S,)``.
    """
    system = _system(system, "system")
    if not isinstance(system, TabularChain):
        raise ProblemError(f"system must be a TabularChain, got {type(system).__name__}")
    P = system.transition_fn(t, theta) if getattr(system, "time_varying", False) else system.transition_fn(theta)
    return jnp.asarray(P)[x]


def _tabular_kl(p: jax.Array, q: jax.Array) -> jax.Array:
    # sum_x' p log(p / q) with 0 log 0 = 0; +inf where q = 0 < p (the KL is infinite there, not NaN).
    pos = p > 0
    safe_p = jnp.where(pos, p, 1.0)
    safe_q = jnp.where(q > 0, q, 1.0)
    terms = jnp.where(pos, p * (jnp.log(safe_p) - jnp.log(safe_q)), 0.0)
    infinite = jnp.any(pos & (q <= 0))
    return jnp.where(infinite, jnp.inf, jnp.sum(terms))


def transition_kl(
    system_p: AbstractSystem | Problem,
    theta_p: PyTree,
    system_q: AbstractSystem | Problem,
    theta_q: PyTree,
    t: float,
    x: jax.Array,
) -> jax.Array:
    r"""KL divergence :math:`\mathrm{KL}(P_{\theta_p}(\cdot \mid x) \,\|\, Q_{\theta_q}(\cdot \mid x))` of one
    transition from state ``x`` at time ``t``, in closed form.

    * Gaussian systems (:class:`~pydso.GaussianChain`, :class:`~pydso.SDESystem`, in any combination): the KL of
      the two Gaussians of :func:`gaussian_transition`, by :func:`gaussian_kl`. For two SDEs with the same
      diffusion :math:`g` this is :math:`\tfrac{dt}2 \|(f_p - f_q)/g\|^2`, the Girsanov rate of the step.
    * :class:`~pydso.TabularChain`: :math:`\sum_{x'} P(x'|x)\log\frac{P(x'|x)}{Q(x'|x)}`, exactly (with
      :math:`0\log 0 = 0`; ``inf`` where :math:`Q(x'|x) = 0 < P(x'|x)`).

    Use it as a per-step cost term (:func:`transition_kl_cost`) to keep a tuned chain close to a reference one;
    summed over an episode it is the KL of the path laws (same initial distribution). Do not use it for systems
    without a closed-form transition (a :class:`~pydso.ProblemError` says so).

    **Arguments:**

    - `system_p`, `system_q`: the systems (or problems holding them) of :math:`P` and :math:`Q`.
    - `theta_p`, `theta_q`: their parameters (often ``theta`` and a fixed reference ``theta_ref``).
    - `t`: the time of ``x`` (``0.0`` for time-invariant chains).
    - `x`: the state.

    **Returns:**

    The KL in nats, a scalar, differentiable in ``theta_p`` and ``theta_q``.
    """
    sp, sq = _system(system_p, "system_p"), _system(system_q, "system_q")
    if isinstance(sp, TabularChain) or isinstance(sq, TabularChain):
        if not (isinstance(sp, TabularChain) and isinstance(sq, TabularChain)):
            raise ProblemError(
                f"transition_kl: system_p is a {type(sp).__name__} and system_q a {type(sq).__name__}; a "
                "TabularChain can only be compared with another TabularChain on the same states"
            )
        p, q = tabular_transition(sp, theta_p, t, x), tabular_transition(sq, theta_q, t, x)
        if p.shape != q.shape:
            raise ProblemError(f"transition_kl: system_p has {p.shape[0]} states but system_q has {q.shape[0]}")
        return _tabular_kl(p, q)
    mp, Lp = gaussian_transition(sp, theta_p, t, x)
    mq, Lq = gaussian_transition(sq, theta_q, t, x)
    return gaussian_kl(mp, Lp, mq, Lq)


def transition_entropy(system: AbstractSystem | Problem, theta: PyTree, t: float, x: jax.Array) -> jax.Array:
    r"""Entropy of one transition, :math:`\mathcal H(P_\theta(\cdot \mid x)) = -\mathbb E[\log P(x' \mid x)]`.

    Gaussian systems: the differential entropy :math:`\tfrac d2(1+\log 2\pi) + \log|\det L|` of
    :func:`gaussian_transition` (for an SDE step, :math:`L = \operatorname{diag}(g)\sqrt{dt}`), by
    :func:`gaussian_entropy`; it does not depend on the mean. :class:`~pydso.TabularChain`: the Shannon entropy
    :math:`-\sum_{x'} P\log P` (with :math:`0\log 0 = 0`).

    **Arguments:** as :func:`transition_kl` for one system.

    **Returns:**

    The entropy in nats, a scalar, differentiable in ``theta``.
    """
    system = _system(system, "system")
    if isinstance(system, TabularChain):
        p = tabular_transition(system, theta, t, x)
        pos = p > 0
        return -jnp.sum(jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1.0)), 0.0))
    mean, L = gaussian_transition(system, theta, t, x)
    return gaussian_entropy(L, dim=mean.shape[0])


# --------------------------------------------------------------------------------------------- cost terms
def _check_weight(weight, name: str) -> float:
    if not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ProblemError(f"{name}: weight must be a finite number, got {weight!r}")
    return float(weight)


def transition_kl_cost(
    system: AbstractSystem,
    reference: AbstractSystem,
    reference_theta: PyTree,
    *,
    weight: float = 1.0,
    time_varying: bool = False,
) -> Callable:
    r"""A cost term :math:`\beta\, \mathrm{KL}(P_\theta(\cdot \mid x) \,\|\, Q(\cdot \mid x))` to add to a step
    cost: the per-step KL to a fixed reference chain :math:`Q` = ``reference`` at ``reference_theta``.

    Example (KL-regularised tuning of a pretrained chain):
    ``kl = transition_kl_cost(chain, chain, theta_pretrained, weight=0.1)`` and
    ``Problem(chain, lambda x, th: task(x) + kl(x, th), ...)``.

    **Arguments:**

    - `system`: the system :math:`P_\theta` being optimised.
    - `reference`: the reference system :math:`Q`; `reference_theta`: its (fixed) parameters.
    - `weight`: :math:`\beta`.
    - `time_varying`: return ``cost(t, x, theta)`` instead of ``cost(x, theta)`` (for time-varying problems;
      otherwise ``t = 0.0`` is used, which is right for time-invariant chains only).

    **Returns:**

    A callable ``cost(x, theta)`` (or ``cost(t, x, theta)``) returning a scalar.
    """
    sp, sq = _system(system, "system"), _system(reference, "reference")
    beta = _check_weight(weight, "transition_kl_cost")

    def cost_t(t, x, theta):
        return beta * transition_kl(sp, theta, sq, reference_theta, t, x)

    if time_varying:
        return cost_t
    return lambda x, theta: cost_t(0.0, x, theta)


def transition_entropy_cost(system: AbstractSystem, *, weight: float = 1.0, time_varying: bool = False) -> Callable:
    r"""A cost term :math:`-\alpha\, \mathcal H(P_\theta(\cdot \mid x))` (an entropy bonus: minimising the cost
    maximises the entropy of the closed-loop transition, as in maximum-entropy control).

    **Arguments:**

    - `system`: the system :math:`P_\theta`; `weight`: :math:`\alpha`; `time_varying`: as in
      :func:`transition_kl_cost`.

    **Returns:**

    A callable ``cost(x, theta)`` (or ``cost(t, x, theta)``) returning a scalar.
    """
    sp = _system(system, "system")
    alpha = _check_weight(weight, "transition_entropy_cost")

    def cost_t(t, x, theta):
        return -alpha * transition_entropy(sp, theta, t, x)

    if time_varying:
        return cost_t
    return lambda x, theta: cost_t(0.0, x, theta)
