r"""The interface of an improvement step (a *method* of :func:`pydso.minimize`) and of least-squares problems."""

import abc

import equinox as eqx
import jax

from .._typing import PyTree

__all__ = ["AbstractMethod", "StepStats", "AbstractLeastSquares"]


class StepStats(eqx.Module):
    r"""What one step reports, all scalars evaluated at the parameters *before* the update.

    **Attributes:**

    - ``objective``: an estimate of :math:`J(\theta_k)` (for least squares: :math:`\tfrac12\|r(\theta_k)\|^2`).
    - ``objective_stderr``: its standard error (0 where the objective is exact).
    - ``grad_norm``: the Euclidean norm of the gradient (estimate) used by the step.
    - ``extra``: optional method-specific scalars (effective sample size, step size, ...), a dict with the same
      keys at every step; :func:`pydso.minimize` records each in its history under its name.
    """

    objective: jax.Array
    objective_stderr: jax.Array
    grad_norm: jax.Array
    extra: dict = eqx.field(default_factory=dict)


class AbstractMethod(eqx.Module):
    r"""One improvement step :math:`\theta_{k+1} = M(\theta_k, s_k)` with a state :math:`s_k` (optimiser moments,
    damping, ...). :func:`pydso.minimize` runs any method with the same loop: reproducible keys
    (``fold_in(key, k)``), checkpoint and exact resume, progress bar, divergence guard and one result type.

    Subclasses are final. The state must be a pytree of arrays (it is checkpointed leaf by leaf).
    """

    def check(self, problem, theta: PyTree) -> None:
        """Raise :class:`~pydso.ProblemError` if the method cannot be applied to ``problem`` (called once)."""

    @abc.abstractmethod
    def init(self, problem, theta: PyTree) -> PyTree:
        """The method's initial state at ``theta``."""

    @abc.abstractmethod
    def step(self, problem, theta: PyTree, state: PyTree, *, key: jax.Array) -> tuple[PyTree, PyTree, StepStats]:
        """One step from ``theta``: returns ``(new_theta, new_state, stats)``. ``key`` is this step's key."""

    def converged(self, state: PyTree) -> bool:
        """Whether the method's own stopping test holds in ``state`` (e.g. Levenberg–Marquardt's tolerances);
        :func:`pydso.minimize` then stops early. Stochastic methods have none: the default is ``False``."""
        return False

    def describe(self) -> str:
        """A process-independent description, stored in checkpoints to refuse resuming with another method."""
        return type(self).__name__


class AbstractLeastSquares(eqx.Module):
    r"""A problem whose objective is :math:`J(\theta) = \tfrac12\|r(\theta)\|^2` (system identification, ...),
    which the Gauss–Newton / Levenberg–Marquardt methods of :func:`pydso.minimize` solve."""

    @abc.abstractmethod
    def residuals(self, theta: PyTree) -> jax.Array:
        r"""The residual vector :math:`r(\theta)`, 1-D, traceable and differentiable in ``theta``."""
