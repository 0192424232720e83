"""Estimators by name: the small registry behind ``pydso.Gradient(estimator="pathwise" | "score")``."""

from .._errors import ProblemError
from ._base import AbstractEstimator
from ._pathwise import Pathwise
from ._score import Score

__all__ = ["as_estimator"]


def as_estimator(estimator: "str | AbstractEstimator") -> AbstractEstimator:
    """The estimator object for ``estimator``.

    **Arguments:**

    - ``estimator``: an estimator object (returned as is), ``"pathwise"`` (:class:`Pathwise`) or ``"score"``
      (:class:`Score` with its default :class:`MeanBaseline`).

    **Returns:** an :class:`AbstractEstimator`; raises :class:`~pydso.ProblemError` for anything else.
    """
    if isinstance(estimator, AbstractEstimator):
        return estimator
    if estimator == "pathwise":
        return Pathwise()
    if estimator == "score":
        return Score()
    raise ProblemError(f"unknown estimator {estimator!r}: use 'pathwise', 'score' or an estimator object")
