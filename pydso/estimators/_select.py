"""Estimators by name."""

from .._errors import ProblemError
from ._base import AbstractEstimator
from ._pathwise import Pathwise
from ._score import Score

__all__ = ["as_estimator"]


def as_estimator(estimator: "str | AbstractEstimator") -> AbstractEstimator:
    """``"pathwise"`` -> :class:`Pathwise`, ``"score"`` -> :class:`Score` (mean baseline); objects pass through."""
    if isinstance(estimator, AbstractEstimator):
        return estimator
    if estimator == "pathwise":
        return Pathwise()
    if estimator == "score":
        return Score()
    raise ProblemError(f"unknown estimator {estimator!r}: use 'pathwise', 'score' or an estimator object")
