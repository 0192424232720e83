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
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._errors import ProblemError
from ..systems import Problem
from ._base import Estimate
from ._logged import (
    LoggedBatch,
    _baseline_values,
    _costs,
    _is_terms,
    _terminal,
    as_batch,
    offpolicy_gradient,
)

PyTree = Any

__all__ = [
    "fisher_vector_product",
    "batch_fisher_vector_product",
    "conjugate_gradient",
    "natural_gradient_direction",
    "compatible_natural_gradient",
    "NaturalGradient",
]


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


def _batch_transitions(problem, theta, batch: LoggedBatch, weight_clip=None):
    W = _is_terms(problem, theta, batch, weight_clip, False)[0]
    n = batch.n_episodes
    d = jnp.where(batch.valid, batch.step_weights * W[:, 1:], 0.0) / n
    shape = batch.states.shape[2:]
    x = batch.states[:, :-1].reshape((-1, *shape))
    xn = batch.states[:, 1:].reshape((-1, *shape))
    t = jnp.tile(jnp.arange(batch.horizon) * problem.system.time_step, n)
    return x, xn, d.reshape(-1), t


def batch_fisher_vector_product(problem: Problem, theta: PyTree, data, *, weight_clip=None) -> Callable:
    r"""``v -> F̂ v`` from logged episodes, :math:`\hat F = \frac1n\sum_{i,t} w_t W_{t+1} s_t s_t^\top`."""
    batch = as_batch(data, problem)
    x, xn, d, t = _batch_transitions(problem, theta, batch, weight_clip)
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
    baseline="mean",
    weight_clip: float | None = None,
    gradient: PyTree | None = None,
) -> tuple[PyTree, Estimate, dict]:
    r""":math:`(\hat F + \lambda I)^{-1}\hat g` from logged episodes: :math:`\hat g` by the (off-policy) score
    estimator (:func:`pydso.offpolicy.offpolicy_gradient`, unless ``gradient`` is given), :math:`\hat F v` by
    :func:`batch_fisher_vector_product`, solved by :func:`conjugate_gradient`.

    Returns ``(direction, gradient_estimate, cg_info)``."""
    batch = as_batch(data, problem)
    est = offpolicy_gradient(problem, theta, batch, baseline=baseline, weight_clip=weight_clip)
    g = est.gradient if gradient is None else gradient
    direction, info = _solve_natural(problem, theta, batch, g, weight_clip, damping, cg_iters)
    return direction, est, info


@eqx.filter_jit
def _solve_natural(problem, theta, batch, g, weight_clip, damping, iters):
    """CG on the batch Fisher, built inside one compiled function: the FVP closure is created under the trace,
    so repeated calls (one per natural-gradient step) reuse the compilation instead of keying it on a new
    Python closure each time."""
    fvp = batch_fisher_vector_product(problem, theta, batch, weight_clip=weight_clip)
    return conjugate_gradient(fvp, g, damping=damping, iters=iters)


def compatible_natural_gradient(
    problem: Problem,
    theta: PyTree,
    data,
    *,
    damping: float = 0.0,
    baseline="mean",
    weight_clip: float | None = None,
    rcond: float = 1e-10,
) -> tuple[PyTree, dict]:
    r"""Natural gradient by the compatible-features least squares (module docstring).

    Builds the weighted score-feature matrix :math:`M = \mathrm{diag}(\sqrt{d}) S` (one row per transition,
    ``(N, p)``: use it for moderate ``p``; for networks use :func:`natural_gradient_direction`) and solves
    :math:`\min_u \|M u - \sqrt d\, y\|^2 + \lambda\|u\|^2` by an SVD :math:`M = U\Sigma V^\top`; the same SVD
    applies :math:`(\hat F + \lambda)^{-1}` to the cost gradient. Returns ``(w, info)`` with ``info["advantage_part"]``
    (the pure regression solution) and ``info["fisher_singular_values"]`` (:math:`\Sigma^2`).
    """
    batch = as_batch(data, problem)
    W, W_end, costs, C, _ = _is_terms(problem, theta, batch, weight_clip, False)
    b = _baseline_values(baseline, problem, theta, batch, W, costs, C)
    n = batch.n_episodes
    d = jnp.where(batch.valid, batch.step_weights * W[:, 1:], 0.0) / n
    num = (C[:, 1:] - W[:, 1:] * b) / n  # = d * y
    x, xn, _, t = _batch_transitions(problem, theta, batch, weight_clip)
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

    def cost_objective(v):
        th = unravel(v)
        return (jnp.sum(wl * _costs(problem, th, batch)) + jnp.sum(W_end * _terminal(problem, th, batch))) / n

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


class NaturalGradient(eqx.Module):
    r"""A natural-gradient step usable in a loop: ``theta, info = NaturalGradient(...).step(problem, theta, data)``.

    The step is :math:`\theta - \eta\,d` with :math:`d = (\hat F + \lambda I)^{-1}\hat g` (CG, ``cg_iters``).
    With ``max_kl`` set, :math:`\eta = \sqrt{2\,\text{max\_kl} / d^\top \hat F d}` (the TRPO step length, Schulman
    et al. 2015: the quadratic model of the KL equals ``max_kl``), capped at ``learning_rate`` if that is given.
    """

    damping: float = 1e-3
    cg_iters: int = eqx.field(static=True, default=50)
    learning_rate: float | None = 0.1
    max_kl: float | None = None
    baseline: Any = eqx.field(static=True, default="mean")
    weight_clip: float | None = None

    def step(self, problem: Problem, theta: PyTree, data) -> tuple[PyTree, dict]:
        batch = as_batch(data, problem)
        direction, est, info = natural_gradient_direction(
            problem,
            theta,
            batch,
            damping=self.damping,
            cg_iters=self.cg_iters,
            baseline=self.baseline,
            weight_clip=self.weight_clip,
        )
        fvp = batch_fisher_vector_product(problem, theta, batch, weight_clip=self.weight_clip)
        d_flat = ravel_pytree(direction)[0]
        quad = d_flat @ ravel_pytree(fvp(direction))[0]
        if self.max_kl is not None:
            eta = jnp.sqrt(2.0 * self.max_kl / jnp.maximum(quad, 1e-30))
            if self.learning_rate is not None:
                eta = jnp.minimum(eta, self.learning_rate)
        elif self.learning_rate is not None:
            eta = jnp.asarray(self.learning_rate)
        else:
            raise ProblemError("NaturalGradient needs a learning_rate or a max_kl")
        new = jax.tree.map(lambda t, d: t - eta * d, theta, direction)
        return new, {
            "objective": float(est.objective),
            "objective_stderr": float(est.objective_stderr),
            "step_size": float(eta),
            "predicted_kl": float(0.5 * eta**2 * quad),
            "cg_iterations": int(info["iterations"]),
            "cg_residual": float(info["residual"]),
        }

    __call__ = step
