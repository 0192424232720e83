"""The system-identification error and warning types: :class:`SysIdError`, raised for inconsistent data, models or
options, and :class:`SysIdWarning`, for fits whose report needs care (non-identifiable parameters, residuals that
are not white, a solver that stopped away from an optimum)."""

from __future__ import annotations

from ..._errors import ProblemError


class SysIdError(ProblemError):
    """A system-identification problem is inconsistent (data, model or options); the message names the problem."""


class SysIdWarning(UserWarning):
    """A fit finished but its report needs care: the message says what (and the result records it)."""
