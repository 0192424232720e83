"""Exceptions raised by pydso. Every message names the offending argument and what was expected."""


class ProblemError(ValueError):
    """A problem definition (system, cost, setting, initial distribution, theta) is inconsistent."""


class DivergenceError(RuntimeError):
    """A solve or an optimisation produced non-finite values or failed to converge.

    Raised by :func:`pydso.minimize` with the best parameters seen so far attached as ``best_theta``.
    """

    def __init__(self, message: str, best_theta=None, history=None):
        super().__init__(message)
        self.best_theta = best_theta
        self.history = history


class StabilityWarning(UserWarning):
    """A fixed-step explicit solve is outside its method's stability region at the given parameters (the step
    ``dt`` times a local Jacobian eigenvalue lies where the Runge–Kutta stability function exceeds 1), so the
    simulated trajectory, its cost and its gradient may be finite but wrong. Reduce ``dt`` or use an implicit or
    adaptive solver (see :class:`pydso.ODESystem`)."""
