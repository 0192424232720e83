r"""Natural-gradient steps, a method of :func:`pydso.minimize` (DESIGN.md §1.5; Kakade 2001; Amari 1998).

Each step estimates the score gradient :math:`\hat g` and the Fisher matrix of the chain
:math:`\hat F = \frac1n\sum_{i,t} w_t W_{t+1} s_t s_t^\top` on the step's episodes, solves
:math:`(\hat F + \lambda I) d = \hat g` by conjugate gradients with Fisher-vector products (:math:`F` is never
formed; :func:`pydso.estimators.natural_gradient_direction`) and moves :math:`\theta_{k+1} = \theta_k - \eta d`.
With ``max_kl`` the step length is TRPO's (Schulman et al. 2015): :math:`\eta = \sqrt{2\,\text{max\_kl} /
d^\top \hat F d}`, so that the quadratic model of the :math:`\rho`-weighted KL between the old and new chains equals
``max_kl``. Invariant to smooth reparametrisations of the chain to first order: the method of choice for softmax
(tabular) chains and other badly scaled parametrisations.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._checks import check_nonnegative_number, check_positive_int, check_positive_number
from .._errors import ProblemError
from ..estimators import (
    AbstractBaseline,
    MeanBaseline,
    as_batch,
    check_baseline,
    ess_report,
    natural_gradient_direction,
)
from ._improve import AbstractDataMethod, describe_fields

__all__ = ["NaturalGradient"]


class NaturalGradient(AbstractDataMethod):
    r"""Natural-gradient steps :math:`\theta_{k+1} = \theta_k - \eta\,(\hat F + \lambda I)^{-1}\hat g` (module
    docstring).

    **Arguments:**

    - ``n``: fresh episodes per step (``0``: use ``data`` alone).
    - ``damping``: :math:`\lambda`; it also sets the step of parameters outside the range of :math:`F` (those that
      enter the cost only): :math:`1/\lambda` times their gradient.
    - ``cg_iters``: conjugate-gradient iterations.
    - ``learning_rate``: :math:`\eta` (with ``max_kl``: its upper bound, or ``None`` for none).
    - ``max_kl``: target KL per step (TRPO step length), or ``None``.
    - ``baseline``: baseline of :math:`\hat g` (:class:`~pydso.MeanBaseline` by default).
    - ``weight_clip``: truncation of the per-decision weights (gradient and Fisher).
    - ``data``: a fixed log used at every step (read into memory); ``reuse``: keep earlier steps' episodes.

    When not to use it: deterministic dynamics (no density); very many parameters with few episodes (the empirical
    Fisher is then rank-deficient: raise ``damping``).
    """

    n: int = eqx.field(static=True, default=256)
    damping: float = eqx.field(static=True, default=1e-3)
    cg_iters: int = eqx.field(static=True, default=50)
    learning_rate: float | None = eqx.field(static=True, default=0.1)
    max_kl: float | None = eqx.field(static=True, default=None)
    baseline: AbstractBaseline = eqx.field(default_factory=MeanBaseline)
    weight_clip: float | None = eqx.field(static=True, default=None)
    data: object = None
    reuse: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        check_positive_int(self.cg_iters, "NaturalGradient.cg_iters")
        if self.learning_rate is None and self.max_kl is None:
            raise ProblemError("NaturalGradient needs a learning_rate or a max_kl")
        check_nonnegative_number(self.damping, "NaturalGradient.damping")
        if self.learning_rate is not None:
            check_positive_number(self.learning_rate, "NaturalGradient.learning_rate")
        if self.max_kl is not None:
            check_positive_number(self.max_kl, "NaturalGradient.max_kl")
        if self.weight_clip is not None:
            check_positive_number(self.weight_clip, "NaturalGradient.weight_clip")
        check_baseline(self.baseline)

    def improve_from(self, problem, theta, data, *, key, progress=False):
        """One natural-gradient step from ``data`` (see :meth:`AbstractDataMethod.improve_from`); ``info`` also
        holds ``step_size`` :math:`\\eta`, ``predicted_kl`` :math:`\\tfrac12\\eta^2 d^\\top\\hat F d`,
        ``cg_iterations`` and ``cg_residual``."""
        del key, progress
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
        quad = info["quadratic"]
        if self.max_kl is not None:
            eta = jnp.sqrt(2.0 * self.max_kl / jnp.maximum(quad, 1e-30))
            if self.learning_rate is not None:
                eta = jnp.minimum(eta, self.learning_rate)
        else:
            eta = jnp.asarray(self.learning_rate)
        new = jax.tree.map(lambda t, d: t - eta * d, theta, direction)
        ess = ess_report(problem, theta, batch, weight_clip=self.weight_clip, warn_below=None)
        return new, {
            "objective": float(est.objective),
            "objective_stderr": float(est.objective_stderr),
            "grad_norm": float(optax.tree.norm(est.gradient)),
            "episodes": batch.n_episodes,
            "ess": ess["episode"],
            "step_size": float(eta),
            "predicted_kl": float(0.5 * eta**2 * quad),
            "cg_iterations": int(info["iterations"]),
            "cg_residual": float(info["residual"]),
        }

    def describe(self) -> str:
        names = ("n", "damping", "cg_iters", "learning_rate", "max_kl", "baseline", "weight_clip", "data", "reuse")
        return describe_fields(self, names)
