"""The system-identification error type: :class:`SysIdError`, raised for inconsistent data, models or options."""

from __future__ import annotations

from ..._errors import ProblemError


class SysIdError(ProblemError):
    """A system-identification problem is inconsistent (data, model or options); the message names the problem."""
