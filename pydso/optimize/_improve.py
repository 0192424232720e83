r"""Methods that learn from logged episodes, and :func:`improve`: one improvement from given data.

A *data method* (:class:`AbstractDataMethod`: :class:`~pydso.optimize.NaturalGradient`,
:class:`~pydso.optimize.Proximal`, :class:`~pydso.optimize.PolicyIteration`) improves :math:`\theta_k` from a set
of episodes with their behaviour log-densities, reweighted to :math:`\theta_k` by per-decision importance weights
(:mod:`pydso.estimators`). Each has one implementation of its improvement, :meth:`AbstractDataMethod.improve_from`,
used in two ways:

* inside :func:`pydso.minimize`, where a step collects ``n`` fresh episodes at :math:`\theta_k` and improves from
  them, plus the fixed log ``data`` if the method has one, plus — with ``reuse=True`` — every episode collected
  at earlier steps (the method's state, checkpointed with the run). ``n=0`` with ``data=log`` learns from a
  fixed log alone, with checkpointing, progress bar and divergence guard;
* by :func:`improve`, one improvement from data you pass (e.g. a stored dataset in a batch job);
* by :func:`~pydso.optimize.certified_improve`, several improvements from a fixed log with steps that keep the log's
  effective sample size and a high-confidence lower bound on each iterate's improvement: it returns the best
  *certified* iterate, not the last one (any data method).

Every step reports the IS estimate of :math:`J(\theta_k)` from the data used, the norm of the gradient estimate,
and the extra scalars ``episodes`` and ``ess`` (the per-episode effective sample size of the data at
:math:`\theta_k`; it falls as :math:`\theta` moves away from the behaviour that logged the data).
"""

import abc
import dataclasses

import equinox as eqx
import jax
import numpy as np

from .._errors import ProblemError
from .._typing import PyTree
from ..engine import rollout
from ..estimators import as_batch, concatenate_batches, empty_batch, is_dataset
from ._base import AbstractMethod, StepStats
from ._minimize import OptimizeResult, minimize

__all__ = ["AbstractDataMethod", "improve", "describe_data", "describe_fields"]

_CORE = ("objective", "objective_stderr", "grad_norm")


def describe_data(data) -> str:
    """A short process-independent description of logged data (type and number of episodes)."""
    if data is None:
        return "None"
    if is_dataset(data):
        return f"Dataset({data.sizes['episode']} episodes)"
    n = getattr(data, "n_episodes", None)
    return f"{type(data).__name__}({n} episodes)"


def describe_fields(obj, names) -> str:
    """``Class(name=value, ...)`` for the given fields of a method, process-independently: numbers, strings and
    ``None`` by ``repr``; modules (baselines, estimators) by class name; functions by qualified name; logged data by
    :func:`describe_data`; other objects (optax transformations) by their type."""

    def render(v):
        if v is None or isinstance(v, bool | int | float | str | np.integer | np.floating):
            return repr(v)
        if is_dataset(v) or hasattr(v, "n_episodes"):
            return describe_data(v)
        if isinstance(v, eqx.Module):
            return type(v).__name__
        if callable(v) and hasattr(v, "__qualname__"):
            return v.__qualname__
        return type(v).__name__

    return f"{type(obj).__name__}(" + ", ".join(f"{k}={render(getattr(obj, k))}" for k in names) + ")"


class AbstractDataMethod(AbstractMethod):
    r"""A method that improves :math:`\theta_k` from logged episodes (module docstring).

    Concrete subclasses declare the fields ``n`` (fresh episodes per step, ``0`` for none), ``data`` (a fixed log:
    :class:`~pydso.Trajectories`, :class:`~pydso.estimators.LoggedBatch` or a dataset with ``behavior_logp``, or
    ``None``) and ``reuse`` (keep the episodes of earlier steps), and implement :meth:`improve_from`.
    """

    n: eqx.AbstractVar[int]
    data: eqx.AbstractVar[object]
    reuse: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def improve_from(self, problem, theta: PyTree, data, *, key: jax.Array, progress: bool | None = False):
        """One improvement of ``theta`` from ``data``.

        **Returns:** ``(new_theta, info)``; ``info`` is a dict of scalars, at least ``objective``,
        ``objective_stderr`` (IS estimate of :math:`J(\\theta)` from ``data``), ``grad_norm``, ``episodes`` and
        ``ess``; :func:`pydso.minimize` records the others as the step's extra scalars.
        """

    def check(self, problem, theta: PyTree) -> None:
        if not problem.system.has_log_prob:
            raise ProblemError(
                f"{type(self).__name__} reweights episodes by their transition densities, but "
                f"{type(problem.system).__name__} has none (deterministic dynamics); use pydso.Gradient with the "
                "pathwise estimator"
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int | np.integer) or self.n < 0:
            raise ProblemError(f"{type(self).__name__}.n must be a non-negative integer, got {self.n!r}")
        if self.n == 0 and self.data is None:
            raise ProblemError(f"{type(self).__name__} needs fresh episodes (n > 0) or a logged dataset (data=...)")
        problem.check_theta(theta)

    def init(self, problem, theta: PyTree) -> PyTree:
        """The episodes kept for reuse (none yet) if ``reuse``, else an empty tuple."""
        return empty_batch(problem, theta) if self.reuse else ()

    def step(self, problem, theta: PyTree, state: PyTree, *, key: jax.Array):
        fresh = None
        if self.n:
            traj = rollout(problem, theta, key=key, n=self.n)
            fresh = as_batch(traj, problem)
        if self.reuse:  # the state holds the episodes of earlier steps
            kept = [b for b in (state, fresh) if b is not None and b.n_episodes]
            state = concatenate_batches(kept) if kept else state
            own = state
        else:
            own = fresh
        sources = [s for s in (self.data, own) if s is not None and getattr(s, "n_episodes", 1) != 0]
        if len(sources) == 1:
            data = sources[0]
        else:
            data = concatenate_batches([as_batch(s, problem) for s in sources])
        new_theta, info = self.improve_from(problem, theta, data, key=jax.random.fold_in(key, 1), progress=False)
        extra = {k: v for k, v in info.items() if k not in _CORE}
        stats = StepStats(info["objective"], info["objective_stderr"], info["grad_norm"], extra)
        return new_theta, state, stats


def improve(
    problem,
    theta: PyTree,
    data,
    *,
    key: jax.Array,
    method: "AbstractDataMethod | None" = None,
    progress: bool | None = None,
) -> OptimizeResult:
    r"""One improvement of ``theta`` from logged ``data`` with a data method, without simulation: exactly one step of
    ``pydso.minimize(problem, theta, key=key, steps=1, method=method)`` with the method's ``n=0``, ``data=data``
    and ``reuse=False``.

    **Arguments:**

    - ``problem``: the DSO problem (its system needs a transition density).
    - ``theta``: the current parameters :math:`\theta_k`.
    - ``data``: :class:`~pydso.Trajectories`, :class:`~pydso.estimators.LoggedBatch` or an ``xarray.Dataset`` with
      ``behavior_logp`` (streamed chunk by chunk by :class:`Proximal`; read into memory by the other methods).
    - ``key``: PRNG key (minibatch shuffling).
    - ``method``: :class:`Proximal` (default ``Proximal()``), :class:`NaturalGradient` or :class:`PolicyIteration`;
      its ``n``, ``data`` and ``reuse`` fields are replaced as above.
    - ``progress``: progress bar (default: only on a terminal).

    **Returns:** an :class:`OptimizeResult` of one step: ``theta`` is the improved parameters; ``history`` holds the
    diagnostics at the given ``theta`` (``objective``, ``objective_stderr``: the IS estimate of :math:`J` from the
    data; ``grad_norm``; ``episodes``; ``ess``) and the method's own (``ess_final`` for :class:`Proximal`,
    ``step_size`` and ``predicted_kl`` for :class:`NaturalGradient`, ...).

    **Raises:** :class:`~pydso.DivergenceError` if the improvement produced non-finite parameters.

    To repeat improvements — from fresh episodes, a fixed log, or both — with checkpoints, call
    ``pydso.minimize(problem, theta, key=key, steps=k, method=Method(n=..., data=...))`` directly.
    """
    if method is None:
        from ._proximal import Proximal

        method = Proximal()
    if not isinstance(method, AbstractDataMethod):
        raise ProblemError(
            f"method must be a method that learns from logged data (pydso.Proximal, pydso.NaturalGradient or "
            f"pydso.PolicyIteration), got {type(method).__name__}"
        )
    if data is None:
        raise ProblemError("improve needs logged data: Trajectories, a LoggedBatch or a dataset with behavior_logp")
    one = dataclasses.replace(method, n=0, data=data, reuse=False)
    return minimize(problem, theta, key=key, steps=1, method=one, progress=progress)
