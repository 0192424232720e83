r"""Natural gradient of a chain (DESIGN.md §1.5; Kakade 2001, *A natural policy gradient*, NIPS; Amari 1998).

The Fisher matrix of the chain is :math:`F = E_\rho E_P[s s^\top]`, :math:`s = \nabla\log P(x' \mid x, \theta)`:
the Hessian at :math:`\theta' = \theta` of the :math:`\rho`-weighted :math:`\mathrm{KL}(P_\theta \,\|\, P_{\theta'})`.
The natural step is :math:`-\eta\,(F + \lambda I)^{-1}\nabla J`. Two ways to get it without forming :math:`F`:

* :func:`fisher_vector_product`: :math:`F v = \sum_i d_i\, s_i (s_i \cdot v)` over weighted transitions
  :math:`(x_i, x'_i, d_i)`, as one ``jvp`` (:math:`u = J v`, :math:`u_i = s_i\cdot v`) and one ``vjp``
  (:math:`J^\top (d \odot u)`) of the vector of per-transition log-probabilities; solved by
  :func:`conjugate_gradient` (Hestenes & Stiefel 1952; as in TRPO, Schulman et al. 2015). From rollouts the
  weights are :math:`d = w_t W_{t+1}/n` (step weight times per-decision IS weight through the transition;
  :math:`W = 1` on-policy), so that :math:`E[\sum_i d_i s_i s_i^\top] = F` (up to horizon truncation).
* :func:`compatible_natural_gradient`: *compatible features* (Sutton et al. 2000; Kakade 2001): the weighted
  least-squares regression of the advantages :math:`y_t = (C^W_{t+1} - W_{t+1} b_t)/(w_t W_{t+1})` on the score
  features :math:`s_t`, :math:`\min_u \sum_t d_t (s_t \cdot u - y_t)^2`, has normal equations
  :math:`\hat F u = \sum_t d_t s_t y_t = \hat g_P` (the transition part of the score gradient), so
  :math:`u = \hat F^{+}\hat g_P`; the cost part :math:`\hat F^+ \nabla L` (costs that depend on :math:`\theta`) is
  added with the same factorisation.

With ``damping == 0`` both use the pseudo-inverse (CG from zero stays in the range of :math:`F`), like
:func:`pydso.exact.natural_gradient`; :math:`F` is singular for redundant parametrisations (softmax logits) and
for parameters that only enter the cost.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._checks import check_nonnegative_number, check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..systems import Problem
from ._base import Estimate
from ._baselines import AbstractBaseline, MeanBaseline, check_baseline
from ._logged import LoggedBatch, as_batch, step_costs, terminal_costs
from ._score import offpolicy_gradient, score_advantages
from ._weights import log_ratios, weighted_returns

__all__ = [
    "fisher_vector_product",
    "batch_fisher_vector_product",
    "batch_transitions",
    "conjugate_gradient",
    "natural_gradient_direction",
    "solve_natural",
    "compatible_natural_gradient",
]

_MEAN_BASELINE = MeanBaseline()  # the default baseline (one immutable instance)


def _logp_fn(problem: Problem, x, x_next, t=None):
    system = problem.system
    if not system.has_log_prob:
        raise ProblemError(f"the Fisher matrix needs a transition log-density; {type(system).__name__} has none")
    ts = jnp.zeros(x.shape[0]) if t is None else t
    return lambda th: jax.vmap(system.log_prob, in_axes=(0, 0, 0, None))(ts, x, x_next, th)


def fisher_vector_product(problem: Problem, theta: PyTree, x, x_next, weights, *, t=None) -> Callable:
    r"""Return ``v -> F v`` (pytrees like ``theta``) for :math:`F = \sum_i d_i s_i s_i^\top` over transitions
    ``x[i] -> x_next[i]`` with weights ``weights[i]`` (:math:`d_i`), via jvp/vjp; :math:`F` is never formed."""
    x_next = jax.lax.stop_gradient(x_next)
    weights = jnp.asarray(weights)
    f = _logp_fn(problem, jax.lax.stop_gradient(x), x_next, t)
    _, jvp_fn = jax.linearize(f, theta)
    _, vjp_fn = jax.vjp(f, theta)

    def fvp(v):
        return vjp_fn(weights * jvp_fn(v))[0]

    return fvp


def batch_transitions(
    problem: Problem, theta: PyTree, batch: LoggedBatch, *, weight_clip: float | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""The transitions of a batch as flat arrays with their Fisher weights.

    **Returns:** ``(x, x_next, d, t)``: states ``(n*H, ...)``, next states ``(n*H, ...)``, weights
    :math:`d = w_t W_{t+1}/n` ``(n*H,)`` (step weight times the per-decision IS weight through the transition, 0 on
    unrecorded steps), and the times ``(n*H,)`` of ``x``.
    """
    W = weighted_returns(problem, theta, batch, log_ratios(problem, theta, batch), weight_clip=weight_clip).weights
    n = batch.n_episodes
    d = jnp.where(batch.valid, batch.step_weights * W[:, 1:], 0.0) / n
    shape = batch.states.shape[2:]
    x = batch.states[:, :-1].reshape((-1, *shape))
    xn = batch.states[:, 1:].reshape((-1, *shape))
    t = jnp.tile(jnp.arange(batch.horizon, dtype=jnp.result_type(float)) * problem.system.time_step, n)
    return x, xn, d.reshape(-1), t


def batch_fisher_vector_product(problem: Problem, theta: PyTree, data, *, weight_clip=None) -> Callable:
    r"""``v -> F̂ v`` from logged episodes, :math:`\hat F = \frac1n\sum_{i,t} w_t W_{t+1} s_t s_t^\top`
    (:func:`batch_transitions`, :func:`fisher_vector_product`); ``data`` is read into memory."""
    batch = as_batch(data, problem)
    x, xn, d, t = batch_transitions(problem, theta, batch, weight_clip=weight_clip)
    return fisher_vector_product(problem, theta, x, xn, d, t=t)


def conjugate_gradient(
    matvec: Callable, b: PyTree, *, damping: float = 0.0, iters: int = 50, tol: float = 1e-12
) -> tuple[PyTree, dict]:
    r"""Solve :math:`(A + \lambda I) x = b` for a symmetric positive (semi-)definite ``matvec`` by conjugate
    gradients from :math:`x_0 = 0` (at most ``iters`` iterations;
    stop when :math:`\|r\| \le` ``tol``
    :math:`\|b\|`). With ``damping == 0`` and a singular :math:`A` (e.g. softmax logits), CG converges to the
    minimum-norm solution only if :math:`b` lies in the range of :math:`A`; a gradient with a component along
    cost-only parameters does not, so use ``damping > 0`` (or :func:`compatible_natural_gradient`).
    Returns ``(x, info)`` with ``info = {"iterations", "residual"}`` (relative residual)."""
    b_flat, unravel = ravel_pytree(b)

    def A(v):
        return ravel_pytree(matvec(unravel(v)))[0] + damping * v

    bnorm = jnp.linalg.norm(b_flat)
    thresh = (tol * bnorm) ** 2

    def cond(state):
        k, _, r, _, rs = state
        return (k < iters) & (rs > thresh)

    def body(state):
        k, x, r, p, rs = state
        Ap = A(p)
        pAp = p @ Ap
        alpha = jnp.where(pAp > 0, rs / jnp.where(pAp > 0, pAp, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = r @ r
        beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
        return k + 1, x, r, r + beta * p, rs_new

    x0 = jnp.zeros_like(b_flat)
    k, x, r, _, rs = jax.lax.while_loop(cond, body, (0, x0, b_flat, b_flat, b_flat @ b_flat))
    rel = jnp.sqrt(rs) / jnp.where(bnorm > 0, bnorm, 1.0)
    return unravel(x), {"iterations": k, "residual": rel}


def natural_gradient_direction(
    problem: Problem,
    theta: PyTree,
    data,
    *,
    damping: float = 1e-3,
    cg_iters: int = 50,
    baseline: AbstractBaseline = _MEAN_BASELINE,
    weight_clip: float | None = None,
    gradient: PyTree | None = None,
) -> tuple[PyTree, Estimate, dict]:
    r""":math:`(\hat F + \lambda I)^{-1}\hat g` from logged (or fresh) episodes.

    **Arguments:**

    - ``problem``, ``theta``: the chain.
    - ``data``: :class:`~pydso.estimators.LoggedBatch`, :class:`~pydso.Trajectories` or an in-memory dataset.
    - ``damping``: :math:`\lambda`; ``cg_iters``: CG iterations (:func:`conjugate_gradient`).
    - ``baseline``: baseline of the score gradient :math:`\hat g` (:func:`~pydso.estimators.offpolicy_gradient`).
    - ``weight_clip``: truncation of the per-decision weights (gradient and Fisher).
    - ``gradient``: use this :math:`\hat g` instead.

    **Returns:** ``(direction, gradient_estimate, cg_info)``; ``cg_info`` also holds ``"quadratic"``
    :math:`d^\top \hat F d` (for a KL-based step length).
    """
    check_nonnegative_number(damping, "damping")
    check_positive_int(cg_iters, "cg_iters")
    problem.check_theta(theta)
    batch = as_batch(data, problem)
    est = offpolicy_gradient(problem, theta, batch, baseline=check_baseline(baseline), weight_clip=weight_clip)
    g = est.gradient if gradient is None else gradient
    direction, info = solve_natural(problem, theta, batch, g, weight_clip=weight_clip, damping=damping, iters=cg_iters)
    return direction, est, info


@eqx.filter_jit
def solve_natural(
    problem: Problem,
    theta: PyTree,
    batch: LoggedBatch,
    g: PyTree,
    *,
    weight_clip: float | None = None,
    damping: float = 1e-3,
    iters: int = 50,
) -> tuple[PyTree, dict]:
    r"""Solve :math:`(\hat F + \lambda I) d = g` on a batch by CG, compiled as one function (the Fisher-vector
    product is built under the trace, so repeated calls — one per natural-gradient step — reuse the compilation).

    **Returns:** ``(d, info)`` with ``info = {"iterations", "residual", "quadratic"}``, ``quadratic`` being
    :math:`d^\top \hat F d`."""
    fvp = batch_fisher_vector_product(problem, theta, batch, weight_clip=weight_clip)
    d, info = conjugate_gradient(fvp, g, damping=damping, iters=iters)
    quad = ravel_pytree(d)[0] @ ravel_pytree(fvp(d))[0]
    return d, {**info, "quadratic": quad}


def compatible_natural_gradient(
    problem: Problem,
    theta: PyTree,
    data,
    *,
    damping: float = 0.0,
    baseline: AbstractBaseline = _MEAN_BASELINE,
    weight_clip: float | None = None,
    rcond: float = 1e-10,
) -> tuple[PyTree, dict]:
    r"""Natural gradient by the compatible-features least squares (module docstring).

    Builds the weighted score-feature matrix :math:`M = \mathrm{diag}(\sqrt{d}) S` (one row per transition,
    ``(N, p)``: use it for moderate ``p``; for networks use :func:`natural_gradient_direction`) and solves
    :math:`\min_u \|M u - \sqrt d\, y\|^2 + \lambda\|u\|^2` by an SVD :math:`M = U\Sigma V^\top`; the same SVD
    applies :math:`(\hat F + \lambda)^{-1}` to the cost gradient.

    **Arguments:** as :func:`natural_gradient_direction`; ``rcond`` cuts small singular values when
    ``damping == 0`` (pseudo-inverse).

    **Returns:** ``(w, info)`` with ``info["advantage_part"]`` (the pure regression solution) and
    ``info["fisher_singular_values"]`` (:math:`\Sigma^2`).
    """
    batch = as_batch(data, problem)
    returns = weighted_returns(problem, theta, batch, log_ratios(problem, theta, batch), weight_clip=weight_clip)
    W = returns.weights
    n = batch.n_episodes
    d = jnp.where(batch.valid, batch.step_weights * W[:, 1:], 0.0) / n
    num = score_advantages(problem, theta, batch, returns, check_baseline(baseline)) / n  # = d * y
    x, xn, _, t = batch_transitions(problem, theta, batch, weight_clip=weight_clip)
    flat, unravel = ravel_pytree(theta)
    f = _logp_fn(problem, x, xn, t)
    S = jax.jacfwd(lambda v: f(unravel(v)))(flat)  # (N, p)
    d = d.reshape(-1)
    num = num.reshape(-1)
    sq = jnp.sqrt(d)
    M = sq[:, None] * S
    y = jnp.where(d > 0, num / jnp.where(sq > 0, sq, 1.0), 0.0)  # sqrt(d) * y
    U, sig, Vt = jnp.linalg.svd(M, full_matrices=False)
    keep = sig > rcond * sig[0]
    if damping == 0:
        inv_sig = jnp.where(keep, 1.0 / jnp.where(keep, sig, 1.0), 0.0)
        u = Vt.T @ (inv_sig * (U.T @ y))
    else:
        u = Vt.T @ ((sig / (sig**2 + damping)) * (U.T @ y))
    # Cost part: per-episode gradient with the score term removed = sum_t w_t W_t grad L (+ terminal).
    wl = jax.lax.stop_gradient(batch.step_weights * W[:, :-1])
    W_end = returns.end_weights

    def cost_objective(v):
        th = unravel(v)
        return (jnp.sum(wl * step_costs(problem, th, batch)) + jnp.sum(W_end * terminal_costs(problem, th, batch))) / n

    g_cost = jax.grad(cost_objective)(flat)
    sig2 = sig**2
    proj = Vt @ g_cost
    if damping == 0:
        inv = jnp.where(keep, 1.0 / jnp.where(keep, sig2, 1.0), 0.0)
        cost_part = Vt.T @ (inv * proj)
    else:
        cost_part = Vt.T @ (proj / (sig2 + damping)) + (g_cost - Vt.T @ proj) / damping
    w = u + cost_part
    return unravel(w), {"advantage_part": unravel(u), "fisher_singular_values": sig2}
