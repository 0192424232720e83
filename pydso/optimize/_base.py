r"""The interface of an improvement step (a *method* of :func:`pydso.minimize`) and of least-squares problems."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp

from .._typing import PyTree

__all__ = ["AbstractMethod", "StepStats", "AbstractLeastSquares", "divergence_flags"]


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


def divergence_flags(old_state: PyTree, new_theta: PyTree, new_state: PyTree) -> tuple[jax.Array, jax.Array]:
    r"""The divergence guard's two tests of one step, traceable (a method may compute them inside its compiled step).

    **Arguments:**

    - ``old_state``, ``new_state``: the method's state before and after the step.
    - ``new_theta``: the parameters after the step.

    **Returns:**

    ``(theta_finite, state_ok)``, two boolean scalars: whether every float leaf of ``new_theta`` is finite, and
    whether no float leaf of the state that was finite became inf/NaN (e.g. Adam's second moment of a gradient of
    ``1e200``, which would freeze theta silently). A leaf whose shape changed (a growing store of episodes) is
    checked for finiteness where the old leaf was finite everywhere; leaves already non-finite before the step (a
    best value initialised to inf) are not checked; a state whose number of leaves changed passes.
    """
    theta_ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_theta) if jnp.issubdtype(x.dtype, jnp.inexact)]
    theta_finite = jnp.all(jnp.array(theta_ok)) if theta_ok else jnp.array(True)
    oks = []
    old_leaves, new_leaves = jax.tree.leaves(old_state), jax.tree.leaves(new_state)
    if len(old_leaves) != len(new_leaves):
        return theta_finite, jnp.array(True)
    for a, b in zip(old_leaves, new_leaves, strict=True):
        if not (hasattr(b, "dtype") and jnp.issubdtype(b.dtype, jnp.inexact)):
            continue
        if a.shape == b.shape:
            oks.append(jnp.all(jnp.isfinite(b) | ~jnp.isfinite(a)))
        elif a.size:
            oks.append(jnp.all(jnp.isfinite(b)) | ~jnp.all(jnp.isfinite(a)))
    return theta_finite, (jnp.all(jnp.array(oks)) if oks else jnp.array(True))


_jit_divergence_flags = eqx.filter_jit(divergence_flags)


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

    def checked_step(
        self, problem, theta: PyTree, state: PyTree, *, key: jax.Array, index: int
    ) -> tuple[PyTree, PyTree, StepStats, tuple[jax.Array, jax.Array]]:
        """Step number ``index`` of a run with key ``key`` (its own key is ``jax.random.fold_in(key, index)``) and
        the divergence guard's tests of its result (:func:`divergence_flags`): returns
        ``(new_theta, new_state, stats, (theta_finite, state_ok))``; what :func:`pydso.minimize` calls. The default
        runs :meth:`step` and the tests as a second compiled call; a method whose step is one compiled function
        overrides it to draw the key and run the tests inside that function (one compilation shared by every step,
        and one call per step: :class:`Gradient`)."""
        new_theta, new_state, stats = self.step(problem, theta, state, key=jax.random.fold_in(key, index))
        return new_theta, new_state, stats, _jit_divergence_flags(state, new_theta, new_state)

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
