"""The pathwise (reparameterisation) gradient estimator."""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import ProblemError
from .._typing import PyTree
from ..backends import AbstractBackend
from ..backends.jax._simulate import simulate_episode
from ..systems import Problem
from ._base import AbstractEstimator, Estimate, mean_and_stderr

__all__ = ["Pathwise", "pathwise_gradient"]


class Pathwise(AbstractEstimator):
    r"""The pathwise (reparameterisation) gradient of DESIGN.md §1.2: per episode,
    :math:`\nabla_\theta` of the simulated objective with the noise held fixed, by reverse-mode autodiff
    through the rollout (``lax.scan``) or through :func:`diffrax.diffeqsolve` with the system's adjoint.

    Needs reparameterised dynamics (:class:`~pydso.DeterministicMap`, :class:`~pydso.GaussianChain`,
    :class:`~pydso.ODESystem`, :class:`~pydso.SDESystem`, or a :class:`~pydso.MarkovChain` declared
    ``reparameterized=True``). Terminal sets make the objective discontinuous in :math:`\theta`: the pathwise
    gradient then ignores the change of the exit time (use :class:`Score`).

    ``checkpoints=k`` rematerialises discrete-time rollouts in ``k`` segments so reverse-mode memory grows like
    ``k + H/k`` instead of ``H`` (long horizons); the gradient is unchanged.
    """

    checkpoints: int | None = eqx.field(static=True, default=None)
    backend: "str | AbstractBackend | None" = eqx.field(static=True, default=None)

    def check(self, problem):
        if not problem.system.reparameterized:
            raise ProblemError(
                f"the pathwise estimator needs reparameterised dynamics, but {type(problem.system).__name__} "
                "samples are not differentiable in theta; use estimator='score'"
            )

    def _estimate(self, problem, theta, keys):
        def objective(theta, key):
            states, costs, _, alive, tc, tw = simulate_episode(problem, theta, key, self.checkpoints)
            w, _ = problem.setting.weights()
            return costs @ jnp.asarray(w, costs.dtype) + tw * tc

        values, grads = jax.vmap(jax.value_and_grad(objective), in_axes=(None, 0))(theta, keys)
        mean, stderr = mean_and_stderr(grads)
        n = keys.shape[0]
        return Estimate(mean, stderr, jnp.mean(values), jnp.std(values, ddof=1) / jnp.sqrt(n))


def pathwise_gradient(problem: Problem, theta: PyTree, *, key: jax.Array, n: int) -> Estimate:
    """Pathwise estimate of :math:`\\nabla J` from ``n`` episodes; see :class:`Pathwise`."""
    return Pathwise().estimate(problem, theta, key=key, n=n)
