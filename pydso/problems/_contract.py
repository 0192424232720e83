"""The contract every problem constructor follows (see :mod:`pydso.problems`): :class:`AbstractConstructedProblem`."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx

from .._typing import PyTree

__all__ = ["AbstractConstructedProblem"]


class AbstractConstructedProblem(eqx.Module):
    r"""What a problem constructor of :mod:`pydso.problems` returns: a DSO problem together with its initial
    parameters and what its kind needs to report on a solution.

    - :attr:`problem` — the object handed to :func:`pydso.minimize`: a :class:`pydso.Problem` (a chain, a cost,
      a setting), or an :class:`pydso.optimize.AbstractLeastSquares` (``residuals(theta) -> 1-D array``) for
      least-squares kinds. Default: the constructed object itself (it *is* the problem).
    - :attr:`theta0` — the initial parameter pytree, in the coordinates the problem is optimised in.
    - :meth:`result` — the kind's report at a parameter value (physical parameters, metrics, uncertainty).

    So for every kind: ``p = constructor(...)``, ``out = pydso.minimize(p.problem, p.theta0, key=key,
    method=...)``, ``report = p.result(out.theta)``. A kind may offer a shortcut (``fit``) that runs the same
    methods with its defaults, but never its own optimisation algorithm.
    """

    theta0: eqx.AbstractVar[PyTree]

    @property
    def problem(self) -> Any:
        """The DSO problem for :func:`pydso.minimize` (default: this object)."""
        return self

    @abc.abstractmethod
    def result(self, theta: PyTree, **info) -> Any:
        """The kind's report at ``theta`` (``info``: solver information to record, e.g. ``n_steps``)."""
