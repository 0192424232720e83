r"""Newton–CG with a trust region on sampled Hessian-vector products: the :class:`NewtonCG` method of
:func:`pydso.minimize` (DESIGN.md §1.4).

Each step draws ``n`` episodes and builds, on those same episodes, the quadratic model
:math:`m(d) = \hat J + \hat g^\top d + \tfrac12 d^\top \hat H d` (:func:`pydso.estimators.local_model`: the score or
pathwise gradient and Hessian-vector products :math:`\hat H v`, never the matrix). The step :math:`d` minimises
:math:`m` within the trust region :math:`\|d\| \le \Delta` by Steihaug's truncated conjugate gradients (stopping at
the boundary or at a direction of negative curvature; Steihaug 1983; Nocedal & Wright, *Numerical Optimization*,
2006, Alg. 7.2). The ratio of actual to predicted decrease

.. math:: \varrho = \frac{\hat J(\theta) - \hat J(\theta + d)}{m(0) - m(d)}

(both objectives on the same episodes: the same noise for the pathwise form, per-decision importance weights for the
score form) decides whether the step is taken (:math:`\varrho > \eta`) and how :math:`\Delta` changes (shrunk to
:math:`\|d\|/4` when :math:`\varrho < 1/4`, doubled up to ``max_radius`` when :math:`\varrho > 3/4` and the step
reached the boundary; Nocedal & Wright Alg. 4.1).

Near the optimum it converges in a few steps where a gradient method needs many (superlinear for an exact
Hessian), and it is insensitive to the scaling of the parameters. When not to use it: with many parameters and few
episodes the sampled Hessian is poor (each CG iteration costs about two gradients); with noisy score estimates far
from the optimum prefer :class:`~pydso.NaturalGradient` or :class:`~pydso.Gradient`; with a terminal set and the
pathwise form (the exit time is not differentiated).
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..engine import episode_keys
from ..estimators import AbstractEstimator, hessian_estimator, local_model
from ._base import AbstractMethod, StepStats

__all__ = ["NewtonCG", "steihaug_cg"]


def _to_boundary(z: jax.Array, d: jax.Array, radius: jax.Array) -> jax.Array:
    """The tau >= 0 with ||z + tau d|| = radius (z inside the region)."""
    a = d @ d
    b = 2.0 * (z @ d)
    c = z @ z - radius**2
    return (-b + jnp.sqrt(jnp.maximum(b**2 - 4.0 * a * c, 0.0))) / (2.0 * jnp.maximum(a, jnp.finfo(a.dtype).tiny))


def steihaug_cg(hvp, g: jax.Array, radius: jax.Array, *, max_iters: int, tol: float, damping: float = 0.0):
    r"""Approximately minimise :math:`g^\top z + \tfrac12 z^\top (H + \lambda I) z` subject to
    :math:`\|z\| \le \Delta` by Steihaug's truncated conjugate gradients (Nocedal & Wright 2006, Alg. 7.2).

    **Arguments:**

    - `hvp`: ``v -> H v`` on flat vectors (traceable).
    - `g`: the gradient, flat.
    - `radius`: the trust radius :math:`\Delta`.
    - `max_iters`: the most CG iterations; `tol`: stop when :math:`\|r\| \le` ``tol`` :math:`\|g\|`.
    - `damping`: :math:`\lambda \ge 0`.

    **Returns:**

    ``(z, info)``: the step and a dict with ``iterations``, ``boundary`` (whether the step hit the trust region
    boundary or a direction of non-positive curvature) and ``hz`` (:math:`(H + \lambda I) z`, accumulated by the
    iterations: no extra product is needed for the model's decrease).
    """
    gnorm = jnp.sqrt(g @ g)
    zeros = jnp.zeros_like(g)

    def cond(carry):
        j, _, _, _, _, done, _ = carry
        return (j < max_iters) & ~done

    def body(carry):
        j, z, Hz, r, d, _, _ = carry
        Bd = hvp(d) + damping * d
        dBd = d @ Bd
        rr = r @ r
        alpha = rr / jnp.where(dBd > 0, dBd, 1.0)
        z_new = z + alpha * d
        outside = (dBd <= 0) | (jnp.sqrt(z_new @ z_new) >= radius)
        tau = _to_boundary(z, d, radius)
        r_new = r + alpha * Bd
        small = jnp.sqrt(r_new @ r_new) <= tol * gnorm
        beta = (r_new @ r_new) / jnp.where(rr > 0, rr, 1.0)
        d_new = -r_new + beta * d
        step = jnp.where(outside, tau, alpha)
        return j + 1, z + step * d, Hz + step * Bd, r_new, d_new, outside | small, outside

    init = (jnp.asarray(0), zeros, zeros, g, -g, gnorm == 0, jnp.asarray(False))
    j, z, Hz, _, _, _, boundary = jax.lax.while_loop(cond, body, init)
    return z, {"iterations": j, "boundary": boundary, "hz": Hz}


@eqx.filter_jit
def _newton_step(method, estimator, problem, theta, state, key):
    model = local_model(problem, theta, episode_keys(key, method.n), estimator)
    g = model.gradient
    radius = state["radius"]
    d, info = steihaug_cg(model.hvp, g, radius, max_iters=method.cg_iters, tol=method.cg_tol, damping=method.damping)
    Hd = info["hz"]
    predicted = -(g @ d + 0.5 * (d @ Hd))
    actual = model.objective - model.objective_at(model.flat + d)
    ratio = actual / jnp.where(predicted > 0, predicted, jnp.inf)
    ratio = jnp.where(jnp.isfinite(ratio), ratio, -1.0)
    accept = ratio > method.eta
    dnorm = jnp.sqrt(d @ d)
    new_radius = jnp.where(
        ratio < 0.25,
        0.25 * dnorm,
        jnp.where((ratio > 0.75) & (dnorm >= 0.99 * radius), jnp.minimum(2.0 * radius, method.max_radius), radius),
    )
    new_radius = jnp.maximum(new_radius, method.min_radius)
    new_flat = jnp.where(accept, model.flat + d, model.flat)
    gnorm = jnp.sqrt(g @ g)
    stats = StepStats(
        model.objective,
        model.objective_stderr,
        gnorm,
        {
            "radius": radius,
            "ratio": ratio,
            "step_norm": jnp.where(accept, dnorm, 0.0),
            "cg_iterations": info["iterations"].astype(g.dtype),
        },
    )
    return model.unravel(new_flat), {"radius": new_radius, "grad_norm": gnorm}, stats


class NewtonCG(AbstractMethod):
    r"""Trust-region Newton–CG steps on sampled Hessian-vector products (module docstring).

    **Arguments:**

    - `n`: episodes per step (the model's gradient, Hessian products and ratio all use them).
    - `estimator`: ``"pathwise"`` / :class:`~pydso.Pathwise` or ``"score"`` / :class:`~pydso.Score`; default:
      pathwise for reparameterised systems, score otherwise (:func:`pydso.estimators.hessian_estimator`).
    - `radius`: the initial trust radius :math:`\Delta_0` (in the flat parameters); `max_radius`, `min_radius`:
      its bounds.
    - `cg_iters`: the most CG iterations per step (each costs one Hessian-vector product); `cg_tol`: relative
      residual at which CG stops.
    - `damping`: :math:`\lambda`, added to the Hessian (Levenberg-style regularisation of a noisy Hessian).
    - `eta`: the smallest ratio :math:`\varrho` at which a step is taken.
    - `gtol`: stop :func:`pydso.minimize` once the gradient estimate's norm falls below it (``None``: never).

    Reported per step (``history``): ``radius``, ``ratio``, ``step_norm`` (0 for a rejected step) and
    ``cg_iterations``.
    """

    n: int = eqx.field(static=True, default=256)
    estimator: "AbstractEstimator | str | None" = None
    radius: float = eqx.field(static=True, default=1.0)
    max_radius: float = eqx.field(static=True, default=100.0)
    min_radius: float = eqx.field(static=True, default=1e-8)
    cg_iters: int = eqx.field(static=True, default=20)
    cg_tol: float = eqx.field(static=True, default=1e-8)
    damping: float = eqx.field(static=True, default=0.0)
    eta: float = eqx.field(static=True, default=0.05)
    gtol: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_positive_int(self.n, "NewtonCG.n")
        check_positive_int(self.cg_iters, "NewtonCG.cg_iters")
        for name in ("radius", "max_radius", "min_radius", "cg_tol"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ProblemError(f"NewtonCG.{name} must be a positive number, got {value!r}")
        if not self.min_radius <= self.radius <= self.max_radius:
            raise ProblemError("NewtonCG needs min_radius <= radius <= max_radius")
        if not isinstance(self.damping, int | float) or self.damping < 0:
            raise ProblemError(f"NewtonCG.damping must be a number >= 0, got {self.damping!r}")
        if not isinstance(self.eta, int | float) or not 0 <= self.eta < 0.25:
            raise ProblemError(f"NewtonCG.eta must lie in [0, 0.25), got {self.eta!r}")
        if self.gtol is not None and not (isinstance(self.gtol, int | float) and self.gtol > 0):
            raise ProblemError(f"NewtonCG.gtol must be a positive number or None, got {self.gtol!r}")

    def check(self, problem, theta: PyTree) -> None:
        hessian_estimator(problem, self.estimator)
        problem.check_theta(theta)

    def init(self, problem, theta: PyTree) -> PyTree:
        dtype = jnp.result_type(float)  # strongly typed, like the updated state: one compilation for every step
        return {"radius": jnp.asarray(self.radius, dtype=dtype), "grad_norm": jnp.asarray(jnp.inf, dtype=dtype)}

    def step(self, problem, theta: PyTree, state: PyTree, *, key: jax.Array):
        return _newton_step(self, hessian_estimator(problem, self.estimator), problem, theta, state, key)

    def converged(self, state: PyTree) -> bool:
        return self.gtol is not None and float(state["grad_norm"]) < self.gtol

    def describe(self) -> str:
        est = self.estimator if isinstance(self.estimator, str | None) else type(self.estimator).__name__
        return (
            f"NewtonCG(n={self.n}, estimator={est}, radius={self.radius}, max_radius={self.max_radius}, "
            f"cg_iters={self.cg_iters}, damping={self.damping}, eta={self.eta})"
        )
