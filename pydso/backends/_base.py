"""The backend interface and its registry."""

import abc
from collections.abc import Callable

import equinox as eqx
import jax

from .._errors import ProblemError
from .._io import load_object
from .._typing import PyTree

__all__ = ["AbstractBackend", "EpisodeBatch", "register_backend", "get_backend", "available_backends"]


class EpisodeBatch(eqx.Module):
    r"""What a backend returns for ``n`` episodes of horizon ``H`` (the raw material of
    :class:`~pydso.Trajectories`).

    **Attributes:**

    - ``states``: ``(n, H+1, *state_shape)``, frozen after absorption in a terminal set.
    - ``costs``: ``(n, H)`` step costs (interval integrals :math:`\int L\,dt` for ODEs, :math:`L\,dt` for SDEs).
    - ``log_probs``: ``(n, H)`` :math:`\log P(x_{t+1}\mid x_t,\theta)` (zeros where there is no density).
    - ``alive``: ``(n, H+1)`` True while the episode has not entered the terminal set.
    - ``terminal_costs``: ``(n,)`` :math:`\Phi` at the state where the episode ends (zeros without one).
    - ``terminal_weights``: ``(n,)`` the setting's weight at that time.
    - ``finite``: ``(n,)`` whether every state of the episode is finite, or None when the backend does not compute
      it (the engine then checks ``states`` itself; a backend that tracks it during the solve saves that pass).
    """

    states: jax.Array
    costs: jax.Array
    log_probs: jax.Array
    alive: jax.Array
    terminal_costs: jax.Array
    terminal_weights: jax.Array
    finite: jax.Array | None = None


class AbstractBackend(eqx.Module):
    """Computes ensembles of episodes of a problem. Subclasses are final (equinox's abstract/final pattern)."""

    name: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def simulate(self, problem, theta: PyTree, keys: jax.Array, *, checkpoints: int | None = None) -> EpisodeBatch:
        """Simulate one episode per key in ``keys`` (shape ``(n,)``) under ``theta``.

        Must be traceable and differentiable in ``theta`` (pathwise gradients), and give the same episode for
        the same key whatever else is in ``keys`` (chunking must not change results). Time is passed through
        everywhere: chains are sampled with ``system.sample(key, t, x, theta)``, costs evaluated with
        ``problem.running_cost(t, x, theta)`` / ``problem.step_cost`` / ``problem.final_cost`` (``t`` the time of
        ``x``, ``k * system.time_step``; the solver's time inside ODE/SDE solves), and a setting's terminal set of an
        ODE/SDE system ends the episode at its zero-crossing (:meth:`pydso.Episodic.exit_condition`).
        """

    def check(self, problem) -> None:
        """Raise :class:`~pydso.ProblemError` if this backend cannot simulate ``problem``."""

    def gradient_groups(self, problem, n: int) -> int:
        """How many groups :class:`~pydso.Pathwise` should split ``n`` episodes into by default: ``n`` (one
        gradient per episode, exact per-episode standard errors) unless this backend simulates the problem with a
        whole-ensemble kernel, whose gradient is cheaper for a few large groups."""
        return n

    def group_size(self, problem, m: int, groups: int) -> int:
        """Episodes per group for ``groups`` vmapped groups of at least ``m`` episodes each (the extra ones are
        padding the estimator masks out). Default ``m``; a backend may widen it to avoid slow array widths."""
        return m


_REGISTRY: dict[str, "Callable[[], AbstractBackend] | str"] = {}


def register_backend(name: str, factory: "Callable[[], AbstractBackend] | str") -> None:
    """Register a backend under ``name``: a zero-argument factory, or ``"module:attribute"`` imported on first
    use (so that optional backends cost nothing until selected)."""
    _REGISTRY[name] = factory


def available_backends() -> tuple[str, ...]:
    """Names of the registered backends (registered, not necessarily importable here)."""
    return tuple(_REGISTRY)


def get_backend(backend: "str | AbstractBackend | None" = None) -> AbstractBackend:
    """A backend instance from a name (``None`` means ``"jax"``) or an instance (returned as is)."""
    if isinstance(backend, AbstractBackend):
        return backend
    name = "jax" if backend is None else backend
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ProblemError(
            f"backend must be one of {sorted(_REGISTRY)} or an AbstractBackend instance, got {backend!r}"
        )
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        factory = load_object(factory, what=f"backend {name!r} (not available here)")
    return factory()
