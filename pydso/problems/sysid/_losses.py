"""The loss specifications: :class:`Simulation`, :class:`MultipleShooting`, :class:`Prediction`,
:class:`GaussianNLL` and their string names (:func:`as_loss`).
"""

from __future__ import annotations

import dataclasses

from ..._checks import check_positive_int
from ._errors import SysIdError


@dataclasses.dataclass(frozen=True)
class Simulation:
    """Output (simulation) error of a free-run simulation."""

    name: str = "simulation"


@dataclasses.dataclass(frozen=True)
class MultipleShooting:
    """Segments of ``segment_length`` samples with their own initial states and weighted continuity residuals.

    ``init``: how segment states start — ``'auto'`` (``model.state_from_output`` if given, else a simulation
    with the initial guess), ``'data'`` or ``'simulate'``.
    """

    segment_length: int = 50
    weight: float = 1.0
    init: str = "auto"
    name: str = "multiple-shooting"

    def __post_init__(self):
        if not isinstance(self.segment_length, int) or self.segment_length < 2:
            raise SysIdError(f"MultipleShooting.segment_length must be an integer >= 2, got {self.segment_length!r}")
        if not self.weight > 0:
            raise SysIdError(f"MultipleShooting.weight must be > 0, got {self.weight!r}")
        if self.init not in ("auto", "data", "simulate"):
            raise SysIdError(f"MultipleShooting.init must be 'auto', 'data' or 'simulate', got {self.init!r}")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """``k``-step-ahead prediction error from states given by the data (``k=1``: one-step error)."""

    k: int = 1
    name: str = "prediction"

    def __post_init__(self):
        check_positive_int(self.k, "Prediction.k", error=SysIdError)


@dataclasses.dataclass(frozen=True)
class GaussianNLL:
    """Gaussian negative log-likelihood of the simulation residuals with one estimated noise std per output."""

    name: str = "nll"


_LOSSES = {
    "simulation": Simulation,
    "output": Simulation,
    "multiple-shooting": MultipleShooting,
    "multiple_shooting": MultipleShooting,
    "ms": MultipleShooting,
    "prediction": Prediction,
    "one-step": Prediction,
    "nll": GaussianNLL,
    "gaussian-nll": GaussianNLL,
}


def as_loss(loss):
    """The loss object for ``loss`` (a loss object, or one of the names of ``_LOSSES``); :class:`SysIdError` else."""
    if isinstance(loss, Simulation | MultipleShooting | Prediction | GaussianNLL):
        return loss
    if isinstance(loss, str) and loss in _LOSSES:
        return _LOSSES[loss]()
    raise SysIdError(f"unknown loss {loss!r}: use one of {sorted(_LOSSES)} or a loss object")
